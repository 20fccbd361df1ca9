"""Your exercise files for ch04."""
