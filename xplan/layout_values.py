"""The values of the layout knobs that take more than one form (recompute, offload, keep_gathered):
their parsers, shared by `xplan.layout` (pydantic validators, `parse_knob`) and the docs."""

from __future__ import annotations

import math
from typing import Any

from xplan.errors import InputError

RECOMPUTE_MODES = ("none", "selective", "full")
OFFLOAD_KINDS = ("optimizer", "params", "activations")
GATHERED_KINDS = ("dense", "moe", "vision")  # blocks by MLP type, and a vision-language model's tower (keep_gathered)


def recompute_policies(recompute: str | float, num_blocks: int) -> list[str]:
    """Policy of each block in order: the mode for all, or for a fraction f the first
    ceil(f x blocks) fully recomputed and the rest none (the runtime and the cost model)."""
    if isinstance(recompute, str):
        return [recompute] * num_blocks
    count = min(num_blocks, math.ceil(recompute * num_blocks - 1e-9))
    return ["full"] * count + ["none"] * (num_blocks - count)


def parse_recompute(value: Any) -> str | float:
    """'none' | 'selective' | 'full' | a fraction of blocks in [0, 1] fully recomputed."""
    if isinstance(value, str) and value in RECOMPUTE_MODES:
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        fraction = float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"recompute must be one of {', '.join(RECOMPUTE_MODES)} or a fraction of layers in [0, 1], got {value!r}."
        ) from None
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"recompute fraction must be in [0, 1], got {fraction}.")
    return "none" if fraction == 0 else "full" if fraction == 1 else fraction


def _parse_subset(value: Any, choices: tuple[str, ...], name: str) -> tuple[str, ...]:
    """'none', a comma-separated string or a list of `choices` -> the chosen ones in declared order."""
    wanted = f"{name} must be 'none' or a comma-separated subset of {', '.join(choices)}"
    if value is None or value == "none" or value == [] or value == ():
        return ()
    if not isinstance(value, (str, list, tuple)):
        raise InputError(f"{wanted}; got {value!r}.")
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip() and str(i).strip() != "none"]
    bad = [i for i in items if i not in choices]
    if bad:
        raise InputError(f"{wanted}; got {', '.join(bad)}.")
    return tuple(k for k in choices if k in items)


def parse_offload(value: Any) -> tuple[str, ...]:
    """'none', a comma-separated string, or a list of offload kinds."""
    return _parse_subset(value, OFFLOAD_KINDS, "offload")


def parse_keep_gathered(value: Any) -> tuple[str, ...]:
    """'none', a comma-separated string, or a list of block kinds (by MLP type; 'vision': the vision
    tower's units) kept gathered."""
    return _parse_subset(value, GATHERED_KINDS, "keep_gathered")
