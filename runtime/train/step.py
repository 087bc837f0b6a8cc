"""One optimizer step: the runtime's only definition of it (train loop, dry run and tests).

Per step, over this rank's micro-batches of the step's global batch:

1. forward each micro-batch to the sum of its token losses, divide by the token count of the
   whole global batch and backward, so gradients summed over micro-batches and ranks (every FSDP2
   reduction is a SUM, see `distributed.parallelize`) are the gradient of the global mean loss;
2. defer gradient sync: with fsdp == 1 nothing is sharded, so accumulating unsharded gradients
   over micro-batches costs no memory and saves one gradient reduction (copies at world size 1,
   all-reduces across HSDP replicas) per extra micro-batch; gradients are reduced after the last
   one only. With fsdp > 1 every micro-batch reduce-scatters, so accumulated gradients stay sharded;
3. finish the gradient reduction (ZeRO-1 reduce-scatters the accumulated gradients onto each
   rank's optimizer shard; FSDP2 reduced them during backward), clip on the global gradient norm
   (dense and expert meshes), the optimizer step, the LR schedule step, `zero_grad(set_to_none=True)`.

`StepHooks` lets a caller observe the step between these stages (the dry run labels memory and
times phases there) without a second copy of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xplan.runtime import distributed as D

from . import loss as L

# loss_fn(model, micro_batch) -> the sum of the micro-batch's token losses (a scalar with grad)
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def token_loss_fn(kind: str = "chunked", chunk_tokens: int = L.DEFAULT_CHUNK_TOKENS,
                  device: torch.device | str | None = None) -> LossFn:
    """The plan's loss: `token_loss_sum` (loss kernel `kind` inside the LM head) of a micro-batch
    with `input_ids`, `labels` and `positions`, moved to `device` first when given."""

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        if device is not None:
            batch = batch.to(device)
        return L.token_loss_sum(model, batch.input_ids, batch.labels, batch.positions, kind, chunk_tokens,
                                pixel_values=batch.pixel_values)

    return loss_fn


class StepHooks:
    """Called at the seams of `train_step`; the default does nothing."""

    def micro_batch_start(self, index: int) -> None: ...

    def forward_done(self, index: int) -> None: ...

    def backward_done(self, index: int) -> None: ...

    def optimizer_start(self) -> None: ...

    def optimizer_done(self) -> None: ...


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's summed token losses (float64, detached, not yet reduced)
    global_tokens: int  # the step's normaliser: label tokens of the whole global batch
    grad_norm: torch.Tensor  # global gradient norm before clipping
    lr: float  # the learning rate the optimizer step used
    skipped: bool = False  # non-finite gradients: no optimizer step was taken

    def global_loss(self, meshes: D.Meshes) -> float:
        """Mean token loss of the whole global batch (one all-reduce over every rank)."""
        total = self.loss_sum.clone()
        if meshes.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total.item()) / self.global_tokens


def defers_grad_sync(model: nn.Module, meshes: D.Meshes, num_micro_batches: int) -> bool:
    """Whether gradient reduction waits for the last micro-batch (see the module docstring)."""
    return meshes.layout.fsdp == 1 and num_micro_batches > 1 and hasattr(model, "set_requires_gradient_sync")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence, loss_fn: LossFn,
               global_tokens: int, meshes: D.Meshes, max_norm: float, scheduler=None,
               hooks: StepHooks | None = None, skip_nonfinite: bool = False) -> StepResult:
    """One optimizer step over this rank's `micro_batches` (see the module docstring).

    `skip_nonfinite`: when the global gradient norm (the same on every rank) is not finite, leave
    the weights, optimizer and schedule untouched and report the step as skipped (real tensors
    only: the check reads the norm's value)."""
    hooks = hooks or StepHooks()
    defer_sync = defers_grad_sync(model, meshes, len(micro_batches))
    loss_sum = torch.zeros((), dtype=torch.float64, device=meshes.device)
    for index, batch in enumerate(micro_batches):
        hooks.micro_batch_start(index)
        if defer_sync:
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        D.set_last_micro_batch(model, index == len(micro_batches) - 1)  # layout.keep_gathered
        token_loss = loss_fn(model, batch)
        hooks.forward_done(index)
        (token_loss / global_tokens).backward()
        loss_sum += token_loss.detach().double()
        del token_loss  # the dry run measures what a step keeps alive
        hooks.backward_done(index)
    hooks.optimizer_start()
    D.reduce_gradients(model)
    lr = float(optimizer.param_groups[0]["lr"])
    grad_norm = D.clip_grad_norm_(model, max_norm, meshes)
    skipped = skip_nonfinite and not bool(torch.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    hooks.optimizer_done()
    return StepResult(loss_sum, global_tokens, grad_norm, lr, skipped)


__all__ = ["LossFn", "StepHooks", "StepResult", "defers_grad_sync", "token_loss_fn", "train_step"]
