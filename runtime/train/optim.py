"""AdamW and the learning-rate schedule (gradient clipping: `xplan.runtime.distributed.clip_grad_norm_`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from xplan.runtime import distributed as D


def build_optimizer(model: nn.Module, settings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights, biases and sinks are not decayed).

    `settings` is the plan's OptimizerSettings. The multi-tensor (foreach) implementation: the
    parameters are FSDP2 DTensors, and one DTensor dispatch per list instead of per tensor and op
    is what keeps the optimizer step cheap (about 5% of a small CPU step otherwise). Under ZeRO-1
    it steps on this rank's fp32 shards (`optimizer_parameters`; same global shapes, so the same
    decay rule) and gathers the parameters after each step (`bind_optimizer`).
    """
    decay, no_decay = [], []
    for _, param in D.optimizer_parameters(model):
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                  foreach=True)
    D.bind_optimizer(model, optimizer)
    return optimizer


class LRSchedule:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then constant, cosine or linear decay to `min_lr_ratio` at `total_steps`."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        if kind not in ("constant", "cosine", "linear"):
            raise ValueError(f"schedule kind must be constant, cosine or linear; got {kind!r}")
        self.kind, self.total_steps = kind, max(1, total_steps)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`schedule` is the plan's ScheduleSettings; `total_steps` the plan's step count (not --steps, so a
    run cut short and resumed follows the same curve)."""
    fn = LRSchedule(schedule.kind, total_steps, schedule.warmup_steps, schedule.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
