"""Branch and bound in the search: the bounds hold for every variant of a core, and a bounded
search lists exactly what the unbounded one does (planner/search_bounds.py)."""

from __future__ import annotations

import pytest

import xplan.cost_models as cost_models
from xplan.planner import search_bounds
from xplan.planner.pricing import Workload
from xplan.planner.search import search

WORKLOADS = [
    ("qwen3-8b", "h800", 4096, 64, 8),  # dense: one block kind
    ("qwen3-30b-a3b", "h800", 4096, 64, 16),  # MoE: EP, experts kept gathered
    ("qwen3-30b-a3b", "h800", 32768, 8, 8),  # long sequences: token tiles, activation offload
    ("qwen3-30b-a3b", "a3", 4096, 64, 8),  # two ranks per device
]


def core_key(layout) -> tuple:
    return (layout.dp_mode, layout.fsdp, layout.ep, layout.sp, layout.tp, layout.pp, layout.micro_batch,
            layout.kernels.loss)


@pytest.mark.parametrize("model, hardware, seq, batch, devices", WORKLOADS)
def test_bounds_hold_for_every_variant(model, hardware, seq, batch, devices, monkeypatch):
    """`fastest` is no slower than any variant, `lightest` no heavier than any (every variant
    priced by the exhaustive search)."""
    workload = Workload(model, hardware, seq, batch)
    bounds: dict[tuple, tuple[float, float]] = {}
    cannot_matter = search_bounds.SearchBounds.cannot_matter

    def record(self, c, fitting, exact=False):
        bounds[core_key(c.base)] = (c.fastest, self.lightest(c))
        return cannot_matter(self, c, fitting, exact)

    monkeypatch.setattr(search_bounds.SearchBounds, "cannot_matter", record)
    search(workload, devices)
    monkeypatch.undo()

    priced = []
    estimate = cost_models.estimate

    def keep(*args, **kwargs):
        est = estimate(*args, **kwargs)
        priced.append(est)
        return est

    monkeypatch.setattr(cost_models, "estimate", keep)
    search(workload, devices, exhaustive=True)
    checked = 0
    for est in priced:
        key = core_key(est.layout)
        if key not in bounds:
            continue  # the pricing of smallest peaks, or a core the bounded search never reached
        fastest, lightest = bounds[key]
        tps = est.tokens_per_s_per_device
        assert tps <= fastest * (1 + 1e-9), (est.layout, tps, fastest)
        assert est.memory.allocated >= lightest * (1 - 1e-9), (est.layout, est.memory.allocated, lightest)
        checked += 1
    assert checked > 100 and len(bounds) > 5


@pytest.mark.parametrize("model, hardware, seq, batch, devices", WORKLOADS)
def test_bounded_search_lists_what_the_unbounded_one_does(model, hardware, seq, batch, devices):
    workload = Workload(model, hardware, seq, batch)
    bounded, unbounded = search(workload, devices), search(workload, devices, bound=False)
    assert [e.layout for e in bounded.plans] == [e.layout for e in unbounded.plans]
    assert [e.layout for e in bounded.pareto] == [e.layout for e in unbounded.pareto]
    assert bounded.best_runnable.layout == unbounded.best_runnable.layout


def test_bounded_3d_search_lists_what_the_unbounded_one_does():
    """With TP/PP priced (plans the runtime refuses among them), the bound skips no core that
    could beat the best runnable plan found."""
    workload = Workload("qwen3-8b", "h800", 4096, 16)  # TP 2 layouts among the listed plans
    bounded, unbounded = search(workload, 4, allow_3d=True), search(workload, 4, allow_3d=True, bound=False)
    assert any(e.layout.tp > 1 for e in bounded.plans)
    assert [e.layout for e in bounded.plans] == [e.layout for e in unbounded.plans]
    assert bounded.best_runnable.layout == unbounded.best_runnable.layout


def test_listed_plans_stay_within_the_listed_share_and_bounds_save_pricing():
    workload = Workload("qwen3-235b-a22b", "h800", 4096, 256)
    result = search(workload, 256)
    assert result.candidates_evaluated < search(workload, 256, bound=False).candidates_evaluated
    best = result.plans[0].tokens_per_s_per_device
    for est in [*result.plans, *result.pareto]:
        assert est.tokens_per_s_per_device >= search_bounds.LISTED_SHARE * best


def test_reported_plans_are_priced_exactly():
    """The search ranks with memory-bound ops summed per key; what it reports is the estimate
    `price` gives the same layout."""
    from xplan.planner.pricing import price

    workload = Workload("qwen3-30b-a3b", "h800", 4096, 64)
    result = search(workload, 16)
    for est in [*result.plans[:3], *result.pareto[:3], result.best_runnable]:
        again = price(workload, est.layout)
        assert est.tokens_per_s_per_device == again.tokens_per_s_per_device
        assert est.time == again.time and est.memory == again.memory
