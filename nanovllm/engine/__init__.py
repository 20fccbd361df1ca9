"""The engine: requests in, tokens out. io.py is the boundary every chapter shares."""
