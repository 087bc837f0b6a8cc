"""What each plan precision executes, and fp8 training through torchao.

- ``fp32``: everything in float32 (exact parity tests).
- ``bf16``: compute in bfloat16 on float32 master weights (FSDP2's MixedPrecisionPolicy, or
  ZeRO-1's bf16 replicas), gradients reduced in float32.
- ``fp8``: ``bf16`` plus float8 GEMMs in the linear layers: torchao's `Float8Linear` replaces each
  `nn.Linear` of the decoder blocks (attention projections, dense and shared-expert MLPs) before
  any parallelism wraps the model, as torchtitan does. Inputs, weights and output gradients are
  cast to float8 with dynamic scales (the plan's `training.fp8_recipe`: ``tensorwise``, one scale
  per tensor, or ``rowwise``, one per row) and multiplied by `torch._scaled_mm`. The weights stay
  bf16 for FSDP2's all-gathers (the cost model prices them so). On CPU `torch._scaled_mm` has a
  reference kernel: the numerics are fp8's, the speed is not; on CUDA below compute capability
  8.9 (no fp8 tensor cores) torchao emulates the scaled GEMM in higher precision.

Kept in bf16 under fp8, and why: the LM head and the embedding (the loss is sensitive to them and
the chunked loss reads the head's weight directly), the routers (small, and routing decisions
flip under fp8 noise), norms and the attention products (not GEMMs of weights: SDPA), linear
layers whose widths are not multiples of 16 (`_scaled_mm`'s alignment), and the routed experts:
torchao's fp8 grouped GEMM (`torchao.prototype.moe_training`) needs CUDA SM90 Triton kernels and
`torch._scaled_grouped_mm`; it is not wired here yet, so the grouped expert GEMMs run in bf16.
`apply_fp8` reports all of this (`PrecisionExecuted`, the run summary's `precision_executed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xplan.errors import InputError

log = logging.getLogger("xplan.runtime")

FP8_RECIPES = ("tensorwise", "rowwise")
_ALIGNMENT = 16  # `torch._scaled_mm` needs both GEMM widths to be multiples of 16
_LAYER_PREFIX = re.compile(r"^(model\.)?layers\.\d+\.")
_KEPT_BF16 = {
    "lm_head": "LM head (loss precision; the chunked loss reads its weight directly)",
    "embedding": "token embedding (a lookup, not a GEMM)",
    "router": "MoE routers (routing decisions are sensitive to fp8 noise)",
    "norms": "RMSNorm layers",
    "attention": "attention products (SDPA / blockwise; not weight GEMMs)",
    "experts": "routed-expert grouped GEMMs (torchao's fp8 grouped GEMM needs CUDA SM90; not wired)",
}


@dataclass
class PrecisionExecuted:
    """What ran for the plan's precision (the run summary's `precision_executed`)."""

    precision: str  # the plan's: fp32 | bf16 | fp8
    compute_dtype: str  # float32 | bfloat16
    master_dtype: str = "float32"
    fp8_recipe: str | None = None
    fp8_gemm: str | None = None  # how the fp8 GEMMs run on this device
    fp8_layers: dict[str, int] = field(default_factory=dict)  # Float8Linear layers: name in a block -> count
    kept_bf16: dict[str, str] = field(default_factory=dict)  # part -> why it stays bf16

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fp8_layer_count": sum(self.fp8_layers.values())}


@contextlib.contextmanager
def _quiet_import():
    """torchao's import warns about each CUDA extension a CPU build cannot load, and torch about a
    deprecated pytree registration torchao makes; neither concerns Float8Linear."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def require_torchao() -> None:
    """InputError naming the install when torchao (fp8 training) is missing."""
    try:
        with _quiet_import():
            import torchao  # noqa: F401
    except ImportError:
        raise InputError("precision fp8 runs through torchao's Float8Linear, which is not installed: "
                         "pip install 'xplan[fp8]' (or torchao), or plan with --precision bf16.") from None


def _fp8_gemm(device_type: str) -> tuple[str, bool]:
    """(description, emulate) of the fp8 GEMMs on `device_type`."""
    if device_type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            return f"emulated (CUDA capability {major}.{minor} has no fp8 tensor cores)", True
        return "torch._scaled_mm on fp8 tensor cores", False
    if device_type == "cpu":
        return "torch._scaled_mm CPU reference kernel (fp8 numerics, not fp8 speed)", False
    return f"torch._scaled_mm on {device_type}", False


def _is_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def _convertible(name: str, module: nn.Module) -> str | None:
    """None when `module` becomes a Float8Linear, else why it stays bf16."""
    if not isinstance(module, nn.Linear):
        return "not a linear layer"
    if _is_head(name):
        return _KEPT_BF16["lm_head"]
    if module.in_features % _ALIGNMENT or module.out_features % _ALIGNMENT:
        return f"widths {module.in_features} x {module.out_features} are not multiples of {_ALIGNMENT}"
    return None


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", device_type: str = "cpu") -> PrecisionExecuted:
    """Swap the model's eligible `nn.Linear` layers for torchao `Float8Linear` (in place, before any
    parallelism) and return what now runs in fp8 and what stays bf16."""
    if recipe not in FP8_RECIPES:
        raise InputError(f"fp8 recipe must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}.")
    require_torchao()
    with _quiet_import():
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    gemm, emulate = _fp8_gemm(device_type)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    converted: dict[str, int] = {}
    unaligned: list[str] = []
    for name, module in model.named_modules():
        short = _LAYER_PREFIX.sub("", name)  # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"
        if _convertible(name, module) is None:
            converted[short] = converted.get(short, 0) + 1
        elif isinstance(module, nn.Linear) and not _is_head(name) and short not in unaligned:
            unaligned.append(short)
    kept = dict(_KEPT_BF16)
    if unaligned:
        kept["unaligned linears"] = f"{', '.join(unaligned)}: widths not multiples of {_ALIGNMENT}"
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: _convertible(fqn, m) is None)
    log.info("fp8 (%s, %s): %d linear layers in Float8Linear", recipe, gemm, sum(converted.values()))
    return PrecisionExecuted("fp8", "bfloat16", fp8_recipe=recipe, fp8_gemm=gemm, fp8_layers=converted,
                             kept_bf16=kept)


def apply_precision(model: nn.Module, precision: str, recipe: str = "tensorwise",
                    device_type: str = "cpu") -> PrecisionExecuted:
    """The model-level part of `precision` (fp8 layers; the dtypes are the data-parallel wrapper's),
    recorded on the model for `precision_executed`."""
    if precision == "fp8":
        executed = apply_fp8(model, recipe, device_type)
    else:
        executed = PrecisionExecuted(precision, "float32" if precision == "fp32" else "bfloat16")
    model._xplan_precision = executed  # type: ignore[attr-defined]
    return executed


def precision_executed(model: nn.Module) -> dict[str, Any] | None:
    """What `apply_precision` put on `model`, as plain data (None when it was not applied)."""
    executed = getattr(model, "_xplan_precision", None)
    return executed.to_dict() if executed is not None else None


__all__ = ["FP8_RECIPES", "PrecisionExecuted", "apply_fp8", "apply_precision", "precision_executed",
           "require_torchao"]
