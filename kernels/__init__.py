"""Triton kernels (installed as ffkern.kernels)."""
