"""Triton kernels (installed as fusedattn.kernels): one module per op family."""
