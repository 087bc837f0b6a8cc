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

VISION_PARTS = ("vision", "vision_embed")  # the trace stages of the vision tower and its projector


def image_share(fraction: float, micro_batch: int) -> float:
    """The busiest rank's image samples over its micro-batch: ceil(m f) / m."""
    return math.ceil(round(micro_batch * fraction, 9)) / micro_batch


def vision_flops_per_token(trace) -> float:
    """The vision tower's training FLOPs per token of a micro-batch whose samples all carry images."""
    group = trace.others.get("vision")
    return (group.flops_forward + group.flops_backward) / trace.tokens if group is not None else 0.0
