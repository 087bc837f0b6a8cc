"""FSDP2 resharding per block kind (`layout.keep_gathered`).

ZeRO-3 (the default) reshards every block after its forward and gathers it again in backward:
two all-gathers per block and micro-batch. A block kind named in `keep_gathered` (by its MLP:
``dense`` or ``moe``; the routed-expert units of a MoE block follow it) keeps its parameters
gathered across the step's micro-batches instead (ZeRO-2-like; ``vision``: a vision-language
model's tower units, `parallelize`): `fully_shard(...,
reshard_after_forward=False)`, and `reshard_after_backward` off for every micro-batch but the
last, so one all-gather per step remains. After the last backward the blocks reshard: the
optimizer updates the shards, and the next step gathers the new values. Gradients are still
reduce-scattered every micro-batch (they stay sharded).
"""

from __future__ import annotations

from torch import nn

from xplan.layout import Layout

from ..models.moe import MoE


def keeps_gathered(block: nn.Module, layout: Layout) -> bool:
    """Whether `block` (a decoder layer) keeps its parameters gathered across micro-batches."""
    kind = "moe" if isinstance(getattr(block, "mlp", None), MoE) else "dense"
    return kind in layout.keep_gathered


def mark_kept(model: nn.Module, units: list[nn.Module]) -> None:
    """Remember the FSDP units that stay gathered (`set_last_micro_batch` toggles them)."""
    model._xplan_kept_units = list(units)  # type: ignore[attr-defined]


def set_last_micro_batch(model: nn.Module, last: bool) -> None:
    """Before each micro-batch: kept units reshard after the step's last backward only."""
    for unit in getattr(model, "_xplan_kept_units", ()):
        unit.set_reshard_after_backward(last)


__all__ = ["keeps_gathered", "mark_kept", "set_last_micro_batch"]
