"""Your exercise files for ch01."""
