"""Kernel registry and implementations: what runs in each kernel slot on each device type.

`registry.py` is the table (implementations, what each needs, preference order and fallback per
plan choice and device type); `apply.py` puts a plan's choices on a model and reports what runs;
`attention.py`, `flex.py` and `npu.py` are the attention implementations, `triton_permute.py` and
`triton_rmsnorm.py` the Triton kernels (imported only where selected: CUDA, or tests under
TRITON_INTERPRET=1).
"""

from .apply import REGISTRY_SLOTS, apply_kernels, compute_dtype
from .registry import CHOICES, IMPLEMENTATIONS, Implementation, describe, layout_runs, select

__all__ = ["CHOICES", "IMPLEMENTATIONS", "REGISTRY_SLOTS", "Implementation", "apply_kernels", "compute_dtype",
           "describe", "layout_runs", "select"]
