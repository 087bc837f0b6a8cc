"""The train loop's view of the distributed runtime (`xplan.runtime.distributed`): process group,
meshes, the parallelized model, and this rank's share of a step's data (gradient clipping is part of
the step, `step.train_step`).

Every run, world size 1 included, goes through the same path: a process group, the plan's meshes
and `parallelize` (EP → Ulysses → recompute → offload → FSDP2 with SUM gradient reductions).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from xplan.errors import InputError
from xplan.runtime import distributed as D
from xplan.runtime.kernels import apply_kernels

from ..distributed.allocator import configure_allocator
from .data import Batch, DataSource, rank_windows, split_micro_batches

log = logging.getLogger("xplan.runtime")


@dataclass
class Context:
    """Where this process sits: global rank, data-parallel and sequence-parallel coordinates."""

    rank: int
    world_size: int
    device: torch.device
    device_type: str
    meshes: D.Meshes
    owns_process_group: bool
    kernels_executed: dict[str, str] = field(default_factory=dict)  # set by `parallelize`
    allocator: str = "none"  # the allocator mode in effect (distributed.allocator.configure_allocator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp_rank

    @property
    def dp_size(self) -> int:
        return self.meshes.dp_size

    @property
    def sp_rank(self) -> int:
        return self.meshes.sp_rank

    @property
    def sp_size(self) -> int:
        return self.meshes.sp_size


def setup(layout, device_type: str, timeout_s: float) -> Context:
    """Process group (from the torchrun environment, collective timeout set) and meshes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != layout.ranks:
        raise InputError(f"the plan runs {layout.ranks_text()} but this launch has WORLD_SIZE={world}; "
                         f"launch {layout.ranks} processes (torchrun --nproc-per-node ...) or use a plan for "
                         f"{world} ranks.")
    owns = not dist.is_initialized()
    allocator = configure_allocator(layout.allocator, device_type)  # before anything is allocated on the device
    env = D.init_distributed(device_type, timeout_s)
    try:
        meshes = D.build_meshes(layout, device_type)
    except BaseException:
        if owns:
            D.shutdown_distributed()
        raise
    return Context(env.rank, env.world_size, meshes.device, device_type, meshes, owns, allocator=allocator)


def teardown(ctx: Context) -> None:
    if ctx.owns_process_group:
        D.shutdown_distributed()


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def all_reduce_max(value: float, ctx: Context) -> float:
    if ctx.world_size > 1:
        t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return value


def parallelize(model: nn.Module, layout, ctx: Context, fp8_recipe: str = "tensorwise") -> nn.Module:
    """Apply the plan's layout to `model` (in place; returns it). The kernel registry picks each
    module's kernels first (`ctx.kernels_executed` records what runs in each slot); `fp8_recipe`
    scales fp8 GEMMs (`runtime.precision`)."""
    ctx.kernels_executed = apply_kernels(model, layout, ctx.device_type)
    model = D.parallelize(model, layout, ctx.meshes, fp8_recipe=fp8_recipe)
    compile_blocks(model, layout, ctx.device_type)
    return model


def compile_blocks(model: nn.Module, layout, device_type: str) -> None:
    """kernels.elementwise == 'fused': compile each decoder block (after parallelisms, as
    torchtitan does) so chains of elementwise ops run as single kernels. On CPU the runtime stays
    eager (plans for the cpu profile are priced with 'eager')."""
    if layout.kernels.get("elementwise", "fused") != "fused":
        return
    if device_type == "cpu":
        log.info("kernels.elementwise=fused: blocks stay eager on CPU")
        return
    for block in model.model.layers:
        block.compile()


def micro_batches(source: DataSource, step: int, global_batch: int, micro_batch: int, ctx: Context) -> list[Batch]:
    """This rank's micro-batches of step `step` (0-based): its rows of the global batch, its chunk
    of each sequence (the same slice as `distributed.local_batch`, without building the rows of
    other ranks)."""
    if hasattr(source, "rank_micro_batches"):  # local image + text samples (image_data)
        return source.rank_micro_batches(step, global_batch, micro_batch, ctx.dp_rank, ctx.dp_size, ctx.sp_rank,
                                         ctx.sp_size)
    windows = rank_windows(source, step, global_batch, ctx.dp_rank, ctx.dp_size)
    if getattr(source, "image_tokens", 0):
        from .data import image_micro_batches

        first = step * global_batch + ctx.dp_rank * (global_batch // ctx.dp_size)
        return image_micro_batches(windows, first, micro_batch, source.vision, source.image_tokens, source.seed,
                                   ctx.sp_rank, ctx.sp_size, source.image_fraction)
    return split_micro_batches(windows, micro_batch, ctx.sp_rank, ctx.sp_size)
