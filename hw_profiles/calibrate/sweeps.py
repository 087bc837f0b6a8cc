"""What a calibration measures (the sweeps per device kind) and how it runs (``Setup``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from xplan.errors import InputError

from .timing import accelerator_count, default_name, pick_device


@dataclass(frozen=True)
class Sweep:
    """What to measure; ``FULL``/``QUICK`` per device kind (``sweep_for``)."""

    gemm_shapes: tuple[tuple[int, int, int], ...]  # (m, n, k)
    gemm_layouts: tuple[str, ...]  # nt: x @ W^T (forward), nn: g @ W (dgrad), tn: g^T @ x (wgrad)
    grouped_shapes: tuple[tuple[int, int, int, int], ...]  # (groups, rows per group, n, k)
    elementwise_mib: tuple[float, ...]  # output sizes of the bandwidth sweep
    copy_mib: int
    overhead_numels: tuple[int, ...]  # tiny tensors of the per-kernel overhead chain
    attention_seqs: tuple[int, ...]
    attention_shape: tuple[int, int, int]  # (batch, heads, head_dim)
    collective_kib: tuple[int, ...]
    min_time: float
    repeats: int


_CPU_FULL = Sweep(
    gemm_shapes=((64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
                 (4096, 1024, 1024), (16, 2048, 2048), (256, 1024, 4096), (1024, 4096, 512),
                 (2048, 512, 2048), (512, 256, 2048)),
    gemm_layouts=("nt", "nn", "tn"),
    grouped_shapes=((8, 64, 256, 256), (8, 256, 256, 512), (16, 128, 512, 256), (8, 512, 1024, 512)),
    elementwise_mib=(0.25, 1, 4, 16, 64),
    copy_mib=256,
    overhead_numels=(16, 256, 2048),
    attention_seqs=(128, 256, 512, 1024, 2048),
    attention_shape=(1, 8, 64),
    collective_kib=(4, 64, 1024, 8192, 32768),
    min_time=0.1,
    repeats=5,
)
_CPU_QUICK = Sweep(
    gemm_shapes=((64, 64, 64), (256, 256, 256), (512, 512, 512), (64, 1024, 512)),
    gemm_layouts=("nt",),
    grouped_shapes=((8, 32, 128, 128),),
    elementwise_mib=(1, 8),
    copy_mib=32,
    overhead_numels=(16, 1024),
    attention_seqs=(64, 128, 256),
    attention_shape=(1, 4, 32),
    collective_kib=(16, 1024),
    min_time=0.01,
    repeats=3,
)
_ACCEL_FULL = Sweep(
    gemm_shapes=((256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192),
                 (16, 4096, 4096), (128, 2048, 7168), (1024, 4096, 4096), (8192, 1536, 4096), (4096, 8192, 2048)),
    gemm_layouts=("nt", "nn", "tn"),
    grouped_shapes=((8, 128, 2048, 1024), (16, 512, 1536, 4096), (32, 256, 2048, 7168), (64, 128, 1024, 2048)),
    elementwise_mib=(1, 16, 64, 256, 1024),
    copy_mib=1024,
    overhead_numels=(16, 256, 2048),
    attention_seqs=(512, 1024, 2048, 4096, 8192, 16384),
    attention_shape=(1, 16, 128),
    collective_kib=(64, 1024, 16384, 131072, 524288),
    min_time=0.1,
    repeats=5,
)
_ACCEL_QUICK = Sweep(
    gemm_shapes=((1024, 1024, 1024), (4096, 4096, 4096), (8192, 8192, 8192), (128, 2048, 4096)),
    gemm_layouts=("nt",),
    grouped_shapes=((8, 256, 2048, 1024),),
    elementwise_mib=(16, 256),
    copy_mib=256,
    overhead_numels=(16, 1024),
    attention_seqs=(1024, 2048, 4096, 8192),
    attention_shape=(1, 16, 128),
    collective_kib=(1024, 65536),
    min_time=0.02,
    repeats=3,
)


def sweep_for(device_type: str, quick: bool) -> Sweep:
    if device_type == "cpu":
        return _CPU_QUICK if quick else _CPU_FULL
    return _ACCEL_QUICK if quick else _ACCEL_FULL


@dataclass(frozen=True)
class Setup:
    """How a calibration runs (picklable: it crosses into spawned workers)."""

    device: str
    processes: int
    threads: int  # torch threads per process (CPU)
    quick: bool
    collectives: bool = True
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    custom_sweep: Sweep | None = None  # instead of the device's full/quick sweep (tests)

    @property
    def sweep(self) -> Sweep:
        return self.custom_sweep or sweep_for(self.device, self.quick)



def prepare(processes: int = 2, threads: int | None = None, quick: bool = False, device: str | None = None,
            name: str | None = None, collectives: bool = True, sweep: Sweep | None = None) -> tuple[Setup, str]:
    """Check a calibration's options and resolve their defaults: the ``Setup`` and the profile's
    name. ``processes``: ranks the profile is for; ``threads``: torch threads per process on CPU
    (default cores // processes); ``device``: cpu | cuda | npu (default: an accelerator if
    present); ``sweep``: a custom :class:`Sweep` instead of the device's full / quick one."""
    if processes < 1:
        raise InputError(f"--processes must be at least 1, got {processes}")
    device_type = pick_device(device)
    if device_type != "cpu" and processes > accelerator_count(device_type):
        raise InputError(f"--processes {processes} needs {processes} {device_type} devices but this machine has "
                         f"{accelerator_count(device_type)}; use fewer processes")
    cores = os.cpu_count() or 1
    if threads is None:
        threads = max(1, cores // processes) if device_type == "cpu" else 1
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"--name {name!r} must be a simple name of letters, digits, '.', '_' or '-'")
    setup = Setup(device=device_type, processes=processes, threads=threads, quick=quick, collectives=collectives,
                  custom_sweep=sweep)
    return setup, name or default_name(device_type)
