"""Model blocks on fusedattn kernels (installed as fusedattn.transformer)."""
