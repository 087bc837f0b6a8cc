"""Put the plan's kernel choices on a model: each module gets the implementation the registry
selects for it on this device type, and the run reports what that was (`kernels_executed`).

Modules carry their kernels as attributes the model code reads (the models never import this
package): `attention_kernel` on attention modules, `kernel` on RMSNorm, `token_permuter` on MoE
blocks, `grouped_gemm` on expert modules. Call before the parallelisms (they keep attributes).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..models.layers import RMSNorm
from ..models.moe import MoE
from .attention import attention_accepts, attention_case, attention_function
from .registry import select

log = logging.getLogger("xplan.runtime.kernels")

REGISTRY_SLOTS = ("attention", "moe_gemm", "permute", "loss", "norm", "elementwise")
NO_MOE = "none (no MoE layers)"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype attention and GEMMs run in: the fp32 master weights' own, else bf16 (FSDP2 mixed
    precision)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def experts_aligned(experts: nn.Module, dtype: torch.dtype) -> bool:
    """What `grouped_mm_supported` checks of the weights: 16-byte aligned rows in `dtype`."""
    size = dtype.itemsize
    stacked = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
    return all((p.shape[1] * size) % 16 == 0 and (p.shape[2] * size) % 16 == 0 for p in stacked)


def apply_kernels(model: nn.Module, layout, device_type: str = "cpu",
                  triton_ok: Callable[[], bool] = triton_available) -> dict[str, str]:
    """Set every module's kernel for `layout.kernels` on `device_type` (in place); returns
    {registry slot: implementation(s) that run there}. A choice the device type does not run
    (a dry run on CPU of a CUDA plan) gets the registry's stand-in."""
    kernels = layout.kernels
    dtype = compute_dtype(layout.precision)
    used: dict[str, list[str]] = {slot: [] for slot in REGISTRY_SLOTS}

    def note(slot: str, name: str) -> None:
        if name not in used[slot]:
            used[slot].append(name)

    gemm_impl = {"grouped_mm": "auto", "loop": "loop"}[kernels.moe_gemm]
    for module in model.modules():
        if hasattr(module, "attention_kernel"):
            case = attention_case(module, device_type, dtype)
            name = select("attention", kernels.attention, "attention", device_type,
                          lambda n, case=case: attention_accepts(n, case))
            # "sdpa" is the models' own default dispatch: nothing to replace.
            module.attention_kernel = None if name == "sdpa" else attention_function(name, case)
            note("attention", name)
        if hasattr(module, "grouped_gemm"):
            module.grouped_gemm = gemm_impl
            note("moe_gemm", select("moe_gemm", kernels.moe_gemm, "moe_gemm", device_type,
                                    lambda n, m=module: n != "grouped_mm" or experts_aligned(m, dtype)))
        if isinstance(module, MoE):
            name = select("moe_gemm", kernels.moe_gemm, "permute", device_type, lambda n: n != "triton" or triton_ok())
            module.token_permuter = _triton_permuter() if name == "triton" else None
            note("permute", name)
        if isinstance(module, RMSNorm):
            name = select("elementwise", kernels.elementwise, "norm", device_type,
                          lambda n: n != "triton_rmsnorm" or triton_ok())
            module.kernel = _triton_rms_norm() if name == "triton_rmsnorm" else None
            note("norm", name)
    note("loss", select("loss", kernels.loss, "loss", device_type))
    note("elementwise", select("elementwise", kernels.elementwise, "elementwise", device_type))
    executed = {slot: ", ".join(names) if names else NO_MOE for slot, names in used.items()}
    log.info("kernels on %s: %s", device_type, executed)
    return executed


def _triton_permuter():
    from .triton_permute import TritonTokenPermuter

    return TritonTokenPermuter()


def _triton_rms_norm():
    from .triton_rmsnorm import triton_rms_norm

    return triton_rms_norm


__all__ = ["REGISTRY_SLOTS", "apply_kernels", "compute_dtype", "experts_aligned", "triton_available"]
