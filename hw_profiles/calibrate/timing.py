"""Which device a calibration measures, its name, and the timer every measurement uses."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xplan.errors import InputError

DEVICE_TYPES = ("cpu", "cuda", "npu")


def pick_device(requested: str | None = None) -> str:
    """``cuda`` or ``npu`` when present (or when asked for), else ``cpu``."""
    if requested is not None:
        if requested not in DEVICE_TYPES:
            raise InputError(f"--device must be one of {', '.join(DEVICE_TYPES)}, got {requested!r}")
        if requested != "cpu" and accelerator_count(requested) == 0:
            raise InputError(f"--device {requested}: this machine has no {requested} device; run without --device "
                             "to measure what is here (cpu)")
        return requested
    for kind in ("cuda", "npu"):
        if accelerator_count(kind) > 0:
            return kind
    return "cpu"


def accelerator_count(kind: str) -> int:
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            return 0
    module = getattr(torch, kind, None)
    try:
        return module.device_count() if module is not None and module.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver counts as no device
        return 0


def sync(device: torch.device) -> None:
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over repeats, with the fastest and slowest repeat."""

    median: float
    low: float
    high: float

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median over the repeats."""
        return (self.high - self.low) / self.median if self.median > 0 else 0.0


def time_fn(fn: Callable[[], Any], device: str | torch.device = "cpu", min_time: float = 0.05,
            warmup: int = 2, repeats: int = 5) -> Timing:
    """Time ``fn``: ``repeats`` loops of at least ``min_time`` s each (iteration count fixed by a
    calibration loop), median per-call seconds over the loops."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    iters, elapsed = 1, 0.0
    while True:  # find an iteration count that takes at least min_time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or iters >= 1 << 20:
            break
        iters = min(1 << 20, max(iters * 2, int(iters * min_time / max(elapsed, 1e-9) * 1.2)))
    samples = [elapsed / iters]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        samples.append((time.perf_counter() - t0) / iters)
    return Timing(statistics.median(samples), min(samples), max(samples))



def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device_type: str) -> str:
    if device_type == "cpu":
        return _cpu_name()
    try:
        return getattr(torch, device_type).get_device_name(0)
    except Exception:  # noqa: BLE001
        return device_type


def default_name(device_type: str) -> str:
    if device_type == "cpu":
        return "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device_type).lower()).strip("-")
    return slug or device_type

