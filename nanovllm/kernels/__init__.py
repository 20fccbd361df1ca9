"""Kernels: hand-written code for the hot loops that plain PyTorch does badly (C on the CPU)."""
