"""Your exercise files for ch03."""
