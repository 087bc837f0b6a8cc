"""Run a function on N local gloo processes (tests, small CPU runs).

`spawn(fn, world_size, *args)` starts `world_size` processes with torch.multiprocessing, sets
the torchrun environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a
free port), brings up the process group with `init_distributed` and calls
``fn(rank, world_size, *args)`` in each; `fn` must be importable (module level). An exception in
any rank fails the call; collectives time out after `timeout_s` instead of hanging.

A rank that finished cleanly destroys its process groups and leaves without interpreter
finalization (`xplan.processes.exit_worker`: Gloo threads torn down at shutdown abort the process).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from xplan.processes import exit_worker

from .device import init_distributed, shutdown_distributed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world_size: int, port: int, device_type: str, timeout_s: float, threads: int,
            args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    init_distributed(device_type, timeout_s=timeout_s)
    try:
        fn(rank, world_size, *args)
        torch.distributed.barrier()  # no rank tears down while a peer still talks to it
    finally:
        shutdown_distributed()
    exit_worker()


def spawn(fn, world_size: int, *args, device_type: str = "cpu", timeout_s: float = 120.0, threads: int = 1,
          attempts: int = 3) -> None:
    """Run ``fn(rank, world_size, *args)`` on `world_size` fresh processes; retry on a port clash."""
    for attempt in range(attempts):
        port = free_port()
        try:
            mp.spawn(_worker, args=(fn, world_size, port, device_type, timeout_s, threads, args),
                     nprocs=world_size, join=True)
            return
        except mp.ProcessRaisedException as exc:
            clash = "address already in use" in str(exc).lower() or "eaddrinuse" in str(exc).lower()
            if not clash or attempt == attempts - 1:
                raise


__all__ = ["free_port", "spawn"]
