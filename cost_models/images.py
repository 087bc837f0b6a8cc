"""Mixed image/text batches (vision-language models): the share of the vision tower a step pays.

A plan's `training.image_fraction` f is the share of samples that carry images; the rest are text
only. The runtime spreads them evenly over the global sample order (sample i carries images when
floor((i + 1) f) > floor(i f), `runtime.train.data.carries_images`), so a micro-batch of m
consecutive samples holds floor(m f) or ceil(m f) image samples.

Synchronous data parallelism runs at the pace of its busiest rank: a rank whose micro-batch has
fewer images waits at the first decoder layer's collectives for the ranks still in the vision
tower. So the step pays the tower on ceil(m f) of m samples (`image_share`): at micro-batch 1
the whole tower whenever one rank's sample has images, however small f. Memory is priced at a
micro-batch whose samples all carry images (what the trace holds): some rank runs one.
Model FLOPs (MFU) count the work done on average, f of the tower's (`vision_flops_per_token`).
"""

from __future__ import annotations

import math

from .comm import all_reduce_time, fsdp2_copy_time, fsdp_block_times, fsdp_exposed_time
from .memos import memoised

VISION_PARTS = ("vision", "vision_embed")  # the trace stages of the vision tower and its projector


def image_share(fraction: float, micro_batch: int) -> float:
    """The busiest rank's image samples over its micro-batch: ceil(m f) / m."""
    return math.ceil(round(micro_batch * fraction, 9)) / micro_batch


def vision_flops_per_token(trace) -> float:
    """The vision tower's training FLOPs per token of a micro-batch whose samples all carry images."""
    group = trace.others.get("vision")
    return (group.flops_forward + group.flops_backward) / trace.tokens if group is not None else 0.0


def tower_params(trace) -> int:
    """The vision tower's and projector's parameters (0 for a text model)."""
    group = trace.others.get("vision")
    return group.params_total if group is not None else 0


def tower_kept_params(trace) -> int:
    """The tower's parameters keep_gathered 'vision' keeps gathered: all but the patch embeddings'
    (a unit the runtime reshards anyway, `runtime.distributed.parallelize`). Memoised on the trace."""
    def kept() -> int:
        return tower_params(trace) - sum(
            sum(d.get("params", {}).values()) for _, d in trace.graph.nodes(data=True)
            if d.get("type") == "module" and d.get("stage") == "vision_embed"
            and (d.get("path") == "embeddings" or d.get("path", "").startswith("embeddings.")))

    return memoised(trace.__dict__.setdefault("_tower_kept_params", {}), (), kept)


def vision_fsdp_exposed(profile, trace, layout, times: dict, share: float, grad_accum: int, overlap: bool,
                        param_bytes: int, reduce_bytes: int) -> tuple[float, float]:
    """(exposed collective seconds, FSDP2 copy seconds) of the vision tower's FSDP units per
    micro-batch: the runtime shards the patch embedding, each vision layer and the projector as
    units of their own, prefetching the next one, so like the decoder blocks' their all-gathers
    hide under the tower's forward (`times`: the group times; `share`: of its images the busiest
    rank runs) and the backward's re-gathers and reduce-scatters under its backward. With
    keep_gathered 'vision' they are gathered once per step (ZeRO-2-like)."""
    numel = tower_params(trace) / layout.tp
    if not numel or layout.zero1 or layout.fsdp <= 1:
        return 0.0, 0.0
    ag, rs = fsdp_block_times(profile, numel, 0.0, layout, param_bytes, reduce_bytes)
    if layout.hsdp_replicas > 1:  # each shard's gradients also summed across the replicas
        rs += all_reduce_time(profile, numel / layout.fsdp * reduce_bytes, layout.hsdp_replicas,
                              layout.fsdp * layout.tp, layout.ranks)
    forward = share * sum(times.get((name, "forward"), 0.0) for name in VISION_PARTS)
    backward = share * sum(times.get((name, "backward"), 0.0) for name in VISION_PARTS)
    kept = "vision" in layout.keep_gathered
    exposed = fsdp_exposed_time(ag, rs, forward, backward, grad_accum, kept, overlap)
    copies = 0.0
    if layout.fsdp_buffers == "copy":
        copies = fsdp2_copy_time(profile, numel, layout, param_bytes, reduce_bytes, 1 / grad_accum if kept else 2)
    return exposed, copies
