"""Triton kernels (installed as fusedattn.kernels): one module per op family (attention.py, decode.py); _common.py
holds what they share (constants, exp2 idiom, softcap, mma, op registration)."""
