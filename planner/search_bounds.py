"""Bounds that let the search skip whole core layouts (branch and bound).

A core layout (sharding, EP, SP, micro-batch, loss kernel) has many variants: recompute, offload,
blocks kept gathered, token tiles. Each lever moves time one way and memory the other, so a few
cheap prices bound every variant of a core:

- `fastest`: its throughput with the levers that only cost time off (no recompute, no offload)
  and the one that only saves time on (every block kind kept gathered), the best of its token
  tiles, memory ignored. No variant is faster. It orders the cores, fastest first.
- `lightest`: its allocated peak with the levers that only save memory on (the leanest recompute
  of each chain, the largest offload sets, each token tile) and blocks kept gathered off. No
  variant is lighter.

The search lists plans down to `LISTED_SHARE` of the fastest plan's throughput. A core is skipped
when no variant can beat the best plan the runtime executes found so far, and either none can
reach the listed share of the fastest plan found, or none can be among the `top` listed plans (by
more than `rank_plans`' tie margin) and a plan already found is at least as fast as its bound and
no heavier than its `lightest` (so none of its variants is on the Pareto front). The search checks
every skipped core again against the final plans. tests/test_search_bounds.py checks the bounds
against every variant of dense, MoE and long-sequence cores, and that a bounded search lists
exactly what an unbounded one does.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from xplan.layout import runtime_refusals
from xplan.layout_tiles import tile_count

# rank_plans treats plans within this share of each other's throughput as equally fast.
TIE_MARGIN = 0.9999
# The search lists plans (ranked and on the Pareto front) down to this share of the fastest
# plan's throughput: a layout at half the speed of the best is not an alternative worth weighing
# (to keep memory to spare, `--headroom` asks the search for the fastest plan that leaves it).
LISTED_SHARE = 0.5


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (as it was before, after it), also as a
    decorator (the search's). Pricing thousands of layouts allocates hundreds of thousands of
    short-lived objects, nearly none in cycles (reference counting frees them): with the
    collector on, the allocations trigger collections that traverse the objects the process
    holds, traces included (a deepseek-v3 search spent about a tenth of its time in them)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def tile_tried(tile, tiles: int, selective: bool, choices: int) -> bool:
    """Whether the search tries token tile size `tile` (`tiles` tiles of a rank's micro-batch) on a
    recompute chain: tiling does not combine with selective recompute, and a layout with a single
    tile is tiled only when the tile size was pinned (`choices` sizes, untiled included)."""
    return tile is None or not (selective or (tiles == 1 and choices > 1))


class Variants:
    """Layouts that differ from a core's validated layout only in recompute, offload, keep_gathered
    and tile_tokens, built as copies of it with the changed knobs' values validated once per set
    of values: Layout's rules on these knobs read no other knob (tile_tokens' reads recompute,
    both varied here; the model-level rule reads the sizes), so a set of values valid with one
    core is valid, and parsed the same, with every other. A search builds thousands of variants:
    validating each through `Layout` cost about a tenth of it."""

    KNOBS = frozenset(("recompute", "offload", "keep_gathered", "tile_tokens"))

    def __init__(self) -> None:
        self._values: dict[tuple, dict[str, Any]] = {}

    def of(self, base, **changes: Any):
        """`base.with_changes(**changes)`, as a copy of `base`."""
        if not self.KNOBS.issuperset(changes):
            raise ValueError(f"only {sorted(self.KNOBS)} are varied by copy, got {sorted(changes)}")
        key = tuple(changes.items())
        try:
            values = self._values.get(key)
        except TypeError:  # a value without a hash (a list): validated anew
            return base.with_changes(**changes)
        if values is None:
            made = base.with_changes(**changes)
            values = self._values[key] = {name: getattr(made, name) for name in changes}
        return base.model_copy(update=values)


@dataclass
class _Core:
    """One core layout of the search, validated, with what its variants share."""
    index: int  # position in core_layouts' order (fitting plans are reported in that order)
    core: dict[str, Any]
    base: Any  # Layout
    loss: str
    kernels: dict[str, str]
    grad_accum: int
    sharded: bool  # FSDP / HSDP: blocks may be kept gathered
    fastest: float = float("inf")  # tokens/s/device no variant exceeds
    lean: dict = field(default_factory=dict)  # recompute setting -> least allocated bytes there


@dataclass
class SearchBounds:
    workload: Any
    config: Any
    device_profile: Any
    pricing: Any
    trace_for: Any  # (loss, tiles) -> trace
    top: int
    offloads: list
    keeps: list
    tile_options: list
    chains: list
    recomputes: list
    device_type: str
    variants: Variants = field(default_factory=Variants)
    evaluated: int = 0  # layouts priced for the bounds
    _seen: int = -1  # len(fitting) the caches below were computed for
    _cache: dict = field(default_factory=dict)

    def _tiles(self, c: _Core, tile) -> int:
        return tile_count(c.base.micro_batch * self.workload.seq_len // c.base.sp, tile)

    def _tile_options(self, c: _Core, recompute) -> list:
        """The token tiles the search tries for `c` at `recompute` (`tile_tried`)."""
        return [tile for tile in self.tile_options
                if tile_tried(tile, self._tiles(c, tile), recompute == "selective", len(self.tile_options))]

    def _time_bound(self, c: _Core, recompute) -> float:
        """Tokens/s/device of `c` at `recompute` with the levers that only cost time off (offload)
        and the one that only saves time on (blocks kept gathered), the best of its token tiles
        (tiling adds compute, which can hide FSDP collectives of a communication-bound layout):
        no variant at that recompute setting or later is faster."""
        from xplan.cost_models import step_time

        keep = (self.keeps[0] if len(self.keeps) == 1 else self.keeps[-1]) if c.sharded else ()
        offload = tuple(self.offloads[0]) if len(self.offloads) == 1 else ()
        w, best = self.workload, 0.0
        for tile in self._tile_options(c, recompute):
            layout = self.variants.of(c.base, recompute=recompute, keep_gathered=keep, tile_tokens=tile, offload=offload)
            self.evaluated += 1
            best = max(best, step_time(self.trace_for(c.loss, self._tiles(c, tile)), self.config, layout,
                                       self.device_profile, w.global_batch, w.imbalance, pricing=self.pricing,
                                       image_fraction=w.image_fraction).tokens_per_s_per_device)
        return best

    def fastest(self, c: _Core) -> float:
        """The bound on the core's throughput, memory ignored (see the module docstring)."""
        return self._time_bound(c, self.recomputes[0] if len(self.recomputes) == 1 else "none")

    def _lean_memory(self, c: _Core, recompute) -> float:
        """The least allocated peak of `c` at `recompute`: the largest offload sets, each token tile,
        no block kept gathered."""
        from xplan.cost_models import memory_estimate

        if recompute in c.lean:
            return c.lean[recompute]
        sets = [frozenset(o) for o in self.offloads]
        largest = [tuple(o) for o, s in zip(self.offloads, sets, strict=True) if not any(s < other for other in sets)]
        keep = self.keeps[0] if c.sharded else ()
        w, lean = self.workload, float("inf")
        for tile in self._tile_options(c, recompute):
            tiles = self._tiles(c, tile)
            for offload in largest:
                layout = self.variants.of(c.base, recompute=recompute, offload=offload, keep_gathered=keep,
                                          tile_tokens=tile)
                self.evaluated += 1
                memory = memory_estimate(self.trace_for(c.loss, tiles), layout, self.device_profile,
                                         c.grad_accum, w.imbalance, self.config, pricing=self.pricing)
                lean = min(lean, memory.allocated)
        c.lean[recompute] = lean
        return lean

    def lightest(self, c: _Core) -> float:
        return min(self._lean_memory(c, chain[-1]) for chain in self.chains)

    def _refresh(self, fitting: list, exact: bool) -> None:
        """Threshold, best runnable and front of the plans found. Ranking is quadratic in the plans
        found, so while cores are still being priced it is redone only once they have grown by
        half: a stale threshold decides less well, never wrongly, because the search checks every
        skipped core again against the exact one at the end (a stale runnable plan or front is
        one already found, which is all `cannot_matter` needs of them)."""
        from .search import pareto_front, rank_key, rank_plans

        if self._seen == len(fitting) or (not exact and 0 <= self._seen and len(fitting) < 1.5 * self._seen + 8):
            return
        estimates = [est for _, est in fitting]
        ranked = rank_plans(estimates)
        runnable = next((e for e in sorted(estimates, key=rank_key)
                         if not runtime_refusals(e.layout, self.device_type)), None)
        self._cache = {"threshold": ranked[self.top - 1].tokens_per_s_per_device if len(ranked) >= self.top else None,
                       "runnable": runnable.tokens_per_s_per_device if runnable is not None else None,
                       "front": pareto_front(estimates),
                       "best": max((e.tokens_per_s_per_device for e in estimates), default=0.0)}
        self._seen = len(fitting)

    def _listed_by_speed(self, c: _Core) -> bool:
        """Whether a variant of `c` may still be among the `top` plans or beat the best runnable one
        (by the plans `_refresh` last ranked)."""
        threshold, runnable = self._cache["threshold"], self._cache["runnable"]
        return threshold is None or runnable is None or c.fastest >= TIE_MARGIN * threshold or c.fastest >= runnable

    def memory_cap(self, c: _Core, fitting: list, exact: bool = False) -> float | None:
        """For a core none of whose variants can be among the `top` listed plans nor beat the best
        runnable one: the least allocated peak of the plans found at least as fast as its bound.
        A variant of it that allocates as much is dominated (not on the Pareto front), so the
        search need not price it. None when the core may still be listed by speed."""
        self._refresh(fitting, exact)
        if self._listed_by_speed(c):
            return None
        return min((e.memory.allocated for e in self._cache["front"] if e.tokens_per_s_per_device >= c.fastest),
                   default=float("inf"))

    def cannot_matter(self, c: _Core, fitting: list, exact: bool = False) -> bool:
        """True when no variant of `c` could be listed, on the Pareto front or the best runnable
        plan, given the (core index, estimate) pairs found so far (`exact`: ranked as they stand)."""
        self._refresh(fitting, exact)
        runnable = self._cache["runnable"]
        if runnable is None or c.fastest >= runnable:
            return False
        if c.fastest < LISTED_SHARE * self._cache["best"]:
            return True
        if self._listed_by_speed(c):
            return False
        light = self.lightest(c)
        return any(e.tokens_per_s_per_device >= c.fastest and e.memory.allocated <= light
                   for e in self._cache["front"])
