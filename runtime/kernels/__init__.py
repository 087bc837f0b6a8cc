"""Kernel implementations: `triton_permute.py` and `triton_rmsnorm.py` are Triton kernels (imported
only where selected: CUDA, or tests under TRITON_INTERPRET=1)."""
