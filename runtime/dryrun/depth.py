"""Reduced depth: run a few copies of each repeated block pattern and extrapolate to the full model.

The layer sequence is cut into runs of a repeated block pattern (DeepSeek-V3: [dense x 3][moe x 58];
GPT-OSS: [(sliding, full) x 18]; a recompute fraction splits a run); runs longer than ``layers + 1``
copies keep ``layers`` copies, plus one extra run per such segment with one more copy. Peaks are
kept per moment (phase and the running layer's place: its segment, pattern position and first /
interior / last copy), each moment is extrapolated linearly to the full copy counts, and the
largest is the peak. `tests/test_dryrun.py` checks that this equals the full-depth run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .tracker import Measured, PhasePeak


def layer_classes(config, layout) -> list[tuple[str, str]]:
    """(block kind, recompute policy) of every decoder layer of the full model, in order."""
    from xplan.runtime.models.transformer import DecoderLayer

    policies = layout.recompute_policies(config.num_layers)
    return [(DecoderLayer.block_kind(config, i), policies[i]) for i in range(config.num_layers)]


@dataclass(frozen=True)
class Segment:
    """`repeats` consecutive copies of `pattern` (a tuple of (block kind, recompute policy)) in the
    layer sequence, starting at layer `start`."""

    start: int
    pattern: tuple[tuple[str, str], ...]
    repeats: int


def segments(classes: list[tuple[str, str]], max_period: int = 4) -> list[Segment]:
    """Cover the layer sequence, in order, with maximal repeated patterns: DeepSeek-V3 is
    [dense x 3][moe x 58], GPT-OSS [(sliding, full) x 18], a recompute fraction splits them."""
    out, i, n = [], 0, len(classes)
    while i < n:
        best = (1, 1)
        for period in range(1, max_period + 1):
            pattern = classes[i:i + period]
            if len(pattern) < period:
                break
            repeats = 1
            while classes[i + repeats * period:i + (repeats + 1) * period] == pattern:
                repeats += 1
            if repeats >= 2 and period * repeats > best[0] * best[1]:
                best = (period, repeats)
        period, repeats = best
        out.append(Segment(i, tuple(classes[i:i + period]), repeats))
        i += period * repeats
    return out


def reduced_layers(segs: list[Segment], repeats: dict[int, int]) -> tuple[list[int], list[tuple]]:
    """Layer indices keeping `repeats[k]` copies of segment k's pattern (its first ones), and each
    kept layer's moment key: (segment, position in the pattern, role) with role 'first', 'last',
    'interior' or 'only' by the copy's place among the kept copies. A layer's neighbours, and so
    its FSDP prefetch and reduce-scatter context, are fixed by its key."""
    indices, keys = [], []
    for k, seg in enumerate(segs):
        kept = repeats.get(k, seg.repeats)
        for copy in range(kept):
            role = "only" if kept == 1 else "first" if copy == 0 else "last" if copy == kept - 1 else "interior"
            for q in range(len(seg.pattern)):
                indices.append(seg.start + copy * len(seg.pattern) + q)
                keys.append((k, q, role))
    return indices, keys


def needs_extrapolation(segs: list[Segment], layers: int | None) -> bool:
    return layers is not None and any(seg.repeats > layers + 1 for seg in segs)


# measure(indices of the kept layers, their moment keys) -> the run's peaks per moment
Measure = Callable[[list[int], list[tuple]], Measured]


def extrapolate(segs: list[Segment], layers: int, measure: Measure) -> tuple[Measured, int]:
    """Reduced-depth runs, each moment extrapolated linearly; returns the full-depth moments (with
    the summed timings of every run) and the number of layers of the first run.

    Every segment of repeated blocks longer than `layers + 1` copies runs with `layers` copies, and
    with `layers + 1` in one extra run per such segment. A moment (phase, layer key) holds the same
    blocks' contributions in every run (its neighbours are fixed, `reduced_layers`): model states,
    saved activations and accumulated gradients grow linearly with each segment's copies, and the
    position of the largest moment among interior copies moves with them linearly, so the moment is
    exact at full depth. The maximum over moments is not linear (which block peaks can change
    with depth), which is why it is taken last. `layers` >= 3 so interior copies exist.
    """
    long = [k for k, seg in enumerate(segs) if seg.repeats > layers + 1]
    base = {k: layers for k in long}

    def run(repeats):
        indices, keys = reduced_layers(segs, repeats)
        return measure(indices, keys), len(indices)

    ref, layers_run = run(base)
    extra = {k: run({**base, k: layers + 1})[0] for k in long}

    def linear(get):
        value = get(ref)
        for k, m in extra.items():
            value += (segs[k].repeats - layers) * (get(m) - get(ref))
        return value

    moments = {}
    for key, peak in ref.moments.items():
        if not all(key in m.moments for m in extra.values()):
            continue
        cats = set(peak.categories).union(*(m.moments[key].categories for m in extra.values()))
        host = set(peak.host).union(*(m.moments[key].host for m in extra.values()))
        moments[key] = PhasePeak(
            bytes=linear(lambda m, key=key: m.moments[key].bytes),
            categories={k: linear(lambda m, key=key, k=k: m.moments[key].categories.get(k, 0)) for k in cats},
            where=peak.where,
            host={k: linear(lambda m, key=key, k=k: m.moments[key].host.get(k, 0)) for k in host},
        )
    timings: dict[str, float] = {}
    for m in (ref, *extra.values()):
        for k, v in m.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return Measured(moments, ref.micro_batches, timings), layers_run


__all__ = ["Measure", "Segment", "extrapolate", "layer_classes", "needs_extrapolation", "reduced_layers", "segments"]
