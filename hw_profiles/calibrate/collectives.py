"""Collectives timed through torch.distributed between the local processes of a calibration."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .timing import sync


def _collective_ops(world: int, rank: int, nbytes: int, device) -> dict[str, tuple[Callable[[], Any], float]]:
    """{kind: (call, nbytes)} for a message of about ``nbytes``; nbytes as
    ``xplan.cost_models.kernels.collective_terms`` counts them."""
    import torch.distributed as dist

    numel = max(world, nbytes // 4 // world * world)
    full = torch.ones(numel, device=device)
    part = torch.ones(numel // world, device=device)
    a2a_out = torch.empty(numel, device=device)
    msg = torch.ones(numel, device=device)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def p2p():  # rank 0 <-> 1 ping-pong: two one-way messages; other ranks idle
        if rank == 0:
            dist.send(msg, 1)
            dist.recv(msg, 1)
        elif rank == 1:
            dist.recv(msg, 0)
            dist.send(msg, 0)

    size = numel * 4.0
    return {
        "all_gather": (lambda: all_gather(full, part), size),
        "reduce_scatter": (lambda: reduce_scatter(part, full), size),
        "all_reduce": (lambda: dist.all_reduce(full), size),
        "all_to_all": (lambda: dist.all_to_all_single(a2a_out, full), size),
        "p2p": (p2p, size),
    }


def _time_collective(fn: Callable[[], Any], device, min_time: float, repeats: int) -> float:
    """Median seconds per call; rank 0 fixes the iteration count so every rank calls alike."""
    import torch.distributed as dist

    dev = torch.device(device)
    for _ in range(2):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    guess = torch.tensor([max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))], dtype=torch.int64,
                         device=dev)
    dist.broadcast(guess, 0)
    iters = int(min(guess.item(), 10_000))
    samples = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def measure_collectives_here(world: int, rank: int, sizes_kib: Sequence[int], device, min_time: float,
                             repeats: int) -> list[dict[str, float]]:
    """Time every collective kind at every size (call inside an initialised process group)."""
    out = []
    for kib in sizes_kib:
        for kind, (fn, nbytes) in _collective_ops(world, rank, kib * 1024, device).items():
            seconds = _time_collective(fn, device, min_time, repeats)
            if kind == "p2p":
                seconds /= 2  # a ping-pong is two one-way transfers
            out.append({"kind": kind, "bytes": nbytes, "seconds": seconds, "world": float(world)})
    return out


def backend_for(device_type: str) -> str:
    """The torch.distributed backend of a device kind."""
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device_type]

