"""Your exercise files for ch05."""
