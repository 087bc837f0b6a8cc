"""The dry run against the cost model: `xplan run --dry-run` and `benchmarks/memory_matrix.py`.

The runtime measures (`xplan.runtime.dryrun.dry_run`: rank 0's peak memory under fake tensors);
this module joins it with the prediction: the plan's recorded `predictions.memory_gib`, or the
cost model priced now (`planner.pricing.price`), component by component.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from xplan.errors import InputError
from xplan.runtime.dryrun import COMPONENTS, GIB, DryRunReport, check_dry_run, dry_run, executed_layout

# The prediction's host bytes (cost_models.memory.MemoryBreakdown): total, offloaded activations
# and model states, next to the dry run's host components.
HOST_KEYS = ("offloaded_to_host", "host_activations", "host_states")
HOST_PAIRS = (("activations", "host_activations"), ("model_states", "host_states"))


def predicted_components(plan, imbalance: float, reprice: bool = False) -> tuple[dict[str, float], float, str]:
    """(component -> bytes, total bytes, source): the plan's recorded `predictions.memory_gib`, else
    `planner.pricing.price` now (source 'plan' or 'price') of the layout as the dry run executes it
    (`executed_layout`: blocks eager, not compiled). A plan whose layout the dry run executes
    differently (fused elementwise kernels) is always priced as executed: its recorded numbers
    describe compiled blocks the dry run does not run. Host components (offload) are in the same
    mapping under `HOST_KEYS`."""
    executed = executed_layout(plan.layout)
    memory = None if reprice or executed != plan.layout else (plan.data.predictions or {}).get("memory_gib")
    source = "plan"
    if not memory:
        from xplan.planner.pricing import Workload, price

        est = price(Workload.of_plan(plan, imbalance), executed)
        memory, source = est.memory.gib(), "price"
    if not isinstance(memory, dict):
        raise InputError("the plan's predictions.memory_gib must be a mapping of components to GiB (as `xplan search` "
                         "writes it); fix it or pass --reprice.")
    try:
        out = {k: float(memory.get(k, 0.0) or 0.0) * GIB for k in (*COMPONENTS, *HOST_KEYS)}
        total = float(memory["total"]) * GIB if memory.get("total") is not None else sum(out.values())
    except (TypeError, ValueError):
        raise InputError("the plan's predictions.memory_gib holds a value that is not a number; fix it or pass "
                         "--reprice.") from None
    return out, total, source


@dataclass
class DryRunComparison:
    """A dry run's measured per-rank peak against the predicted one, in bytes."""

    report: DryRunReport
    predicted: dict[str, float]  # component -> bytes (cost model), overhead included
    predicted_total_bytes: float  # the cost model's total (= the components' sum when it has them)
    predicted_source: str  # 'plan' or 'price'
    elapsed_s: float  # pricing and the dry run

    @property
    def measured_peak_bytes(self) -> float:
        return self.report.measured_peak_bytes

    @property
    def predicted_peak_bytes(self) -> float:
        """The cost model's per-rank peak without `overhead` (what a fake-tensor run can see)."""
        return self.predicted_total_bytes - self.predicted.get("overhead", 0.0)

    @property
    def ratio(self) -> float:
        return self.measured_peak_bytes / self.predicted_peak_bytes if self.predicted_peak_bytes else math.inf

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_peak_bytes - self.measured_peak_bytes) / self.measured_peak_bytes

    @property
    def measured_host_bytes(self) -> float:
        return self.report.measured_host_bytes

    @property
    def predicted_host_bytes(self) -> float:
        return self.predicted.get("offloaded_to_host", 0.0)

    @property
    def host_ratio(self) -> float | None:
        """Measured / predicted host bytes (None when neither side offloads anything)."""
        if not self.predicted_host_bytes:
            return None if not self.measured_host_bytes else math.inf
        return self.measured_host_bytes / self.predicted_host_bytes

    @property
    def notes(self) -> list[str]:
        """What neither side sees (the run's caveats, then the unmeasurable overhead), then how it ran."""
        comparison = []
        if self.predicted.get("overhead"):
            comparison.append(f"the predicted overhead ({self.predicted['overhead'] / GIB:.2f} GiB: the caching "
                              "allocator's fragmentation) is not measurable under fake tensors and is left out of "
                              "the compared peak.")
        if self.predicted_source == "price" and (self.report.layout.get("kernels") or {}).get("elementwise") == "fused":
            comparison.append("priced as the dry run ran it: kernels.elementwise=eager (the plan's compiled blocks "
                              "are priced with fewer saved activations).")
        return [*self.report.caveats, *comparison, *self.report.run_notes]

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return {
            "model": r.model,
            "hardware": r.hardware,
            "layout": r.layout,
            "seq_len": r.seq_len,
            "global_batch": r.global_batch,
            "grad_accum": r.grad_accum,
            "micro_batches_run": r.micro_batches_run,
            "world_size": r.world_size,
            "devices": r.devices,
            "ranks_per_device": r.ranks_per_device,
            "rank_memory_budget_gib": r.rank_budget_bytes / GIB if r.rank_budget_bytes else None,
            "measured_over_budget": r.measured_peak_bytes / r.rank_budget_bytes if r.rank_budget_bytes else None,
            "rank": r.rank,
            "imbalance": r.imbalance,
            "measured_peak_gib": r.measured_peak_bytes / GIB,
            "predicted_peak_gib": self.predicted_peak_bytes / GIB,
            # Device and host separately (offload moves bytes from one to the other).
            "measured_device_gib": r.measured_peak_bytes / GIB,
            "predicted_device_gib": self.predicted_peak_bytes / GIB,
            "measured_host_gib": self.measured_host_bytes / GIB,
            "predicted_host_gib": self.predicted_host_bytes / GIB,
            "host_ratio": self.host_ratio if self.host_ratio is None or math.isfinite(self.host_ratio) else None,
            "host_components": {k: {"measured": r.host.get(k, 0.0) / GIB, "predicted": self.predicted.get(p, 0.0) / GIB}
                                for k, p in HOST_PAIRS},
            "predicted_total_gib": self.predicted_total_bytes / GIB,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,  # measured / predicted
            "error": self.error,  # (predicted - measured) / measured
            "components": {k: {"measured": r.measured.get(k, 0.0) / GIB, "predicted": self.predicted.get(k, 0.0) / GIB}
                           for k in COMPONENTS},
            "peak_phase": r.peak_phase,
            "peak_where": r.peak_where,
            "phases": r.phases_gib(),
            "tracker_categories_gib": {k: v / GIB for k, v in r.categories.items()},
            "predicted_source": self.predicted_source,
            "layers_total": r.layers_total,
            "layers_run": r.layers_run,
            "extrapolated": r.extrapolated,
            "elapsed_s": self.elapsed_s,
            "timings_s": dict(r.timings_s),
            "notes": self.notes,
        }


def compare_dry_run(plan, layers: int | None = None, imbalance: float | None = None,
                    reprice: bool = False) -> DryRunComparison:
    """Dry-run `plan` (see `xplan.runtime.dryrun.dry_run`) and compare its peak with the plan's
    recorded prediction, or with the cost model now when the plan has none or `reprice` is set.
    The plan and options are checked before anything is priced or run (InputError)."""
    start = time.perf_counter()
    _, imbalance = check_dry_run(plan, layers, imbalance)
    predicted, total, source = predicted_components(plan, imbalance, reprice)
    report = dry_run(plan, layers=layers, imbalance=imbalance)
    return DryRunComparison(report, predicted, total, source, time.perf_counter() - start)


__all__ = ["HOST_KEYS", "DryRunComparison", "compare_dry_run", "predicted_components"]
