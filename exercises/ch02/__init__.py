"""Your exercise files for ch02."""
