"""Your exercise files for ch07."""
