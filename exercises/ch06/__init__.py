"""Your exercise files for ch06."""
