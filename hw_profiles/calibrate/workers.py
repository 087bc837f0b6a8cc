"""Running a calibration: the spawned ranks, the order every rank measures in, and the merge of
their results (``measure``)."""

from __future__ import annotations

import datetime
import json
import os
import queue as queue_mod
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from xplan.processes import exit_worker

from .benches import (
    measure_attention,
    measure_copy_bandwidth,
    measure_elementwise,
    measure_grouped,
    measure_host_link,
    measure_kernel_overhead,
    measure_matmul,
)
from .collectives import backend_for, measure_collectives_here
from .sweeps import Setup
from .timing import accelerator_count

Progress = Callable[[int, int, str], None]  # (done, total, label)


def _compute_tasks(setup: Setup, device) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """(label, measure) items, in the order every rank runs them."""
    sw = setup.sweep
    mt, rep = sw.min_time, sw.repeats
    tasks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("kernel overhead", lambda: {"overhead": measure_kernel_overhead(sw.overhead_numels, device, mt, rep)}),
        ("memory bandwidth", lambda: {"elementwise": measure_elementwise(sw.elementwise_mib, device, mt, rep),
                                      "copy_bw": measure_copy_bandwidth(sw.copy_mib * 2**20, device, mt, 2, rep)}),
    ]
    for dtype in setup.dtypes:
        for shape in sw.gemm_shapes:
            tasks.append((f"GEMM {dtype} {'x'.join(map(str, shape))}",
                          lambda d=dtype, s=shape: {"gemm": [asdict(r) for r in measure_matmul(
                              [s], d, device, mt, sw.gemm_layouts, rep)]}))
        for shape in sw.grouped_shapes:
            tasks.append((f"grouped GEMM {dtype} {shape[0]}x{'x'.join(map(str, shape[1:]))}",
                          lambda d=dtype, s=shape: {"gemm": [asdict(r) for r in measure_grouped([s], d, device, mt,
                                                                                                 rep)]}))
    b, h, d = sw.attention_shape
    for dtype in setup.dtypes:
        tasks.append((f"attention {dtype}", lambda dt=dtype: {"attention": [
            asdict(r) for r in measure_attention(sw.attention_seqs, b, h, d, dt, device, mt, rep)]}))
    if device.type != "cpu":
        tasks.append(("host link", lambda: {"host_link": measure_host_link(device, sw.copy_mib * 2**20 // 4, mt,
                                                                           rep)}))
    return tasks


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into[key] = value


def _device_for(device_type: str, rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    getattr(torch, device_type).set_device(rank)
    return torch.device(device_type, rank)


def _worker(rank: int, setup: Setup, world: int, compute: bool, init_file: str, out_dir: str, progress_queue) -> None:
    """A spawned rank: the compute sweep (all ranks at once, aligned by barriers), then collectives."""
    import torch.distributed as dist

    if setup.device == "npu":
        import torch_npu  # noqa: F401
    if setup.device == "cpu":
        torch.set_num_threads(setup.threads)
    device = _device_for(setup.device, rank)
    dist.init_process_group(backend_for(setup.device), init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        results: dict[str, Any] = {}
        tasks = _compute_tasks(setup, device) if compute else []
        sw = setup.sweep
        if setup.collectives:
            tasks += [(f"collectives {kib} KiB", lambda kib=kib: {"collectives": measure_collectives_here(
                world, rank, [kib], device, sw.min_time, sw.repeats)}) for kib in sw.collective_kib]
        for label, fn in tasks:
            dist.barrier()
            _merge(results, fn())
            if rank == 0 and progress_queue is not None:
                progress_queue.put(label)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # no rank tears its process group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    if progress_queue is not None:  # its feeder thread must deliver the last labels before os._exit
        progress_queue.close()
        progress_queue.join_thread()
    exit_worker(0)  # skip the interpreter finalization that can abort gloo's threads


def _spawn(setup: Setup, world: int, compute: bool, on_label: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="xplan-calibrate-") as tmp:
        init_file = os.path.join(tmp, "init")
        pc = mp.start_processes(_worker, args=(setup, world, compute, init_file, tmp, q), nprocs=world,
                                join=False, start_method="spawn")
        try:
            while True:
                done = pc.join(timeout=0.2)
                _drain(q, on_label)
                if done:
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise RuntimeError(f"calibration worker failed: {str(exc).strip().splitlines()[-1]}") from None
        _drain(q, on_label)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def _drain(q, on_label: Callable[[str], None]) -> None:
    while True:
        try:
            on_label(q.get_nowait())
        except (queue_mod.Empty, OSError, EOFError):
            return


def _median_over_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank results item by item: times the median over ranks (they ran concurrently)."""
    merged: dict[str, Any] = {}
    first = per_rank[0]
    for key, value in first.items():
        if isinstance(value, list):
            rows = []
            for i, row in enumerate(value):
                new = dict(row)
                for f in ("seconds", "fwd_seconds", "bwd_seconds", "seconds_per_kernel"):
                    if f in row:
                        new[f] = statistics.median(r[key][i][f] for r in per_rank)
                rows.append(new)
            merged[key] = rows
        elif isinstance(value, int | float):
            merged[key] = statistics.median(r[key] for r in per_rank)
        else:
            merged[key] = value
    return merged


def measure(setup: Setup, progress: Progress | None = None) -> dict[str, Any]:
    """Run every measurement of ``setup``; returns plain data (see ``build_profile``).

    ``processes`` >= 2: that many spawned ranks run the compute sweep concurrently, then the
    collectives. ``processes`` == 1: the compute sweep runs in this process (``threads`` threads),
    the collectives between 2 spawned processes (where the device allows 2 ranks).
    """
    probe = _device_for(setup.device, 0) if setup.device != "cpu" else torch.device("cpu")
    n_compute = len(_compute_tasks(setup, probe))
    coll_world = max(2, setup.processes)
    can_collect = setup.collectives and (setup.device == "cpu" or accelerator_count(setup.device) >= coll_world)
    setup = replace(setup, collectives=can_collect)
    total = n_compute + (len(setup.sweep.collective_kib) if can_collect else 0)
    done = 0

    def on_label(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    if progress is not None:
        progress(0, total, "starting")
    if setup.processes >= 2:
        data = _median_over_ranks(_spawn(setup, setup.processes, True, on_label))
    else:
        threads = torch.get_num_threads()
        data = {}
        try:
            if setup.device == "cpu":
                torch.set_num_threads(setup.threads)
            for label, fn in _compute_tasks(setup, probe):
                _merge(data, fn())
                on_label(label)
        finally:
            torch.set_num_threads(threads)
        if can_collect:
            only = replace(setup, processes=coll_world)
            _merge(data, _spawn(only, coll_world, False, on_label)[0])
    data["collective_world"] = coll_world if can_collect else 0
    return data

