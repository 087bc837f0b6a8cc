"""What a dry run measured: rank 0's per-phase peaks and their breakdown, in bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .tracker import COMPONENTS, HOST_COMPONENTS

GIB = 2**30


@dataclass
class DryRunReport:
    """Peak memory of rank 0 under fake tensors (the per-rank peak of the largest rank), in bytes.
    The comparison with a prediction belongs to the application layer (`app/dryrun_compare.py`).

    `world_size` is the ranks started: `devices` × `ranks_per_device` (2 on a3, one rank per die);
    `rank_budget_bytes` is one rank's device memory (the profile's HBM per device / ranks per device)."""

    model: str
    hardware: str
    layout: dict[str, Any]
    seq_len: int
    global_batch: int
    grad_accum: int
    micro_batches_run: int
    world_size: int
    devices: int
    ranks_per_device: int
    rank_budget_bytes: float | None  # None: the hardware profile could not be read
    rank: int
    imbalance: float
    measured_peak_bytes: float
    measured: dict[str, float]  # component -> bytes at the peak
    peak_phase: str  # forward | backward | optimizer
    peak_where: str  # innermost module running at the peak
    phases: dict[str, dict[str, Any]]  # phase -> {peak_bytes, where, components}
    categories: dict[str, float]  # raw tracker categories at the peak
    layers_total: int
    layers_run: int
    extrapolated: bool
    elapsed_s: float
    timings_s: dict[str, float] = field(default_factory=dict)  # where the time went (all runs)
    caveats: list[str] = field(default_factory=list)  # what the fake-tensor run does not simulate
    run_notes: list[str] = field(default_factory=list)  # how it ran (reduced depth, offload)
    measured_host_bytes: float = 0.0  # the step's largest host memory (offload), rank 0
    host: dict[str, float] = field(default_factory=dict)  # host component -> bytes at that moment

    @property
    def notes(self) -> list[str]:
        return [*self.caveats, *self.run_notes]

    def phases_gib(self) -> dict[str, dict[str, Any]]:
        return {p: {"peak_gib": v["peak_bytes"] / GIB, "where": v["where"],
                    "components": {k: b / GIB for k, b in v["components"].items()}}
                for p, v in self.phases.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hardware": self.hardware,
            "layout": self.layout,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "grad_accum": self.grad_accum,
            "micro_batches_run": self.micro_batches_run,
            "world_size": self.world_size,
            "devices": self.devices,
            "ranks_per_device": self.ranks_per_device,
            "rank_memory_budget_gib": self.rank_budget_bytes / GIB if self.rank_budget_bytes else None,
            "rank": self.rank,
            "imbalance": self.imbalance,
            "measured_peak_gib": self.measured_peak_bytes / GIB,
            "measured_over_budget": self.measured_peak_bytes / self.rank_budget_bytes if self.rank_budget_bytes else None,
            "measured_device_gib": self.measured_peak_bytes / GIB,
            "measured_host_gib": self.measured_host_bytes / GIB,
            "components": {k: self.measured.get(k, 0.0) / GIB for k in COMPONENTS},
            "host_components": {k: self.host.get(k, 0.0) / GIB for k in HOST_COMPONENTS},
            "peak_phase": self.peak_phase,
            "peak_where": self.peak_where,
            "phases": self.phases_gib(),
            "tracker_categories_gib": {k: v / GIB for k, v in self.categories.items()},
            "layers_total": self.layers_total,
            "layers_run": self.layers_run,
            "extrapolated": self.extrapolated,
            "elapsed_s": self.elapsed_s,
            "timings_s": dict(self.timings_s),
            "notes": self.notes,
        }


__all__ = ["GIB", "DryRunReport"]
