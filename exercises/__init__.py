"""Exercises: stubs of each chapter's key functions, generated from the reference (tools/make_exercises.py)."""
