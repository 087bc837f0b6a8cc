"""Per-step measurements and their outputs: a JSON-lines file and a live rich table (rank 0).

Peak memory: on CUDA/NPU `max_memory_allocated` (tensors held by the caching allocator, reset at
the start of every step, so the figure is that step's peak); on CPU the process's resident-set
high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`: everything the process ever held, the
Python interpreter and libraries included, never reset), labelled ``rss_peak``.

Step time is wall time between device synchronisations; ``host_cpu_s`` is the process CPU time
of the step (all threads), the steadier figure on a shared CPU machine. Summaries take the median
over steps without the first (which pays one-off costs).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def memory_kind(device_type: str) -> str:
    return "rss_peak" if device_type == "cpu" else "max_memory_allocated"


def _accel(device_type: str):
    return getattr(torch, device_type, None) if device_type in ("cuda", "npu") else None


def reset_peak_memory(device_type: str) -> None:
    mod = _accel(device_type)
    if mod is not None:
        mod.reset_peak_memory_stats()


def peak_memory_gib(device_type: str) -> float:
    mod = _accel(device_type)
    if mod is not None:
        return mod.max_memory_allocated() / GIB
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib * (1 if sys.platform == "darwin" else 1024) / GIB


def peak_reserved_gib(device_type: str) -> float | None:
    """What the caching allocator reserved at most since the last reset (None on CPU): beside
    `peak_memory_gib`, the allocator's fragmentation (`benchmarks/allocator_check.py`)."""
    mod = _accel(device_type)
    return mod.max_memory_reserved() / GIB if mod is not None else None


def synchronize(device_type: str) -> None:
    mod = _accel(device_type)
    if mod is not None:
        mod.synchronize()


def predicted_values(predictions: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(peak memory GiB, step time s) from a plan's predictions block, None where absent.

    Accepts the shapes the planner writes: `peak_memory_gib`, or `memory_gib` as a number or an
    object with `total` (less its `overhead`, the allocator's reserve, which
    `max_memory_allocated` does not see); and `step_time_s`."""
    if not predictions:
        return None, None
    peak = predictions.get("peak_memory_gib")
    if peak is None:
        mem = predictions.get("memory_gib")
        peak = mem.get("total") if isinstance(mem, dict) else mem
        overhead = mem.get("overhead") if isinstance(mem, dict) else None
        if isinstance(peak, (int, float)) and isinstance(overhead, (int, float)):
            # The run measures max_memory_allocated: compare it with the allocated prediction,
            # not with the allocator's reserve on top of it.
            peak = peak - overhead
    step = predictions.get("step_time_s")
    as_float = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return as_float(peak), as_float(step)


def summarize(records: list[dict[str, Any]], predictions: dict[str, Any] | None, world_size: int,
              tokens_per_step: int, memory: str, devices: int | None = None) -> dict[str, Any]:
    """The `xplan run --json` object from the per-step records of this invocation. Throughput is per
    device (`devices`, default one per rank; an a3 device runs 2 ranks), memory per rank."""
    devices = devices or world_size
    times = [r["step_time_s"] for r in records]
    steady = times[1:] if len(times) > 1 else times  # the first step pays one-off costs
    step_time = statistics.median(steady) if steady else None
    peak = max((r["peak_memory_gib"] for r in records), default=None)
    pred_peak, pred_time = predicted_values(predictions)
    return {
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "steps": [r["step"] for r in records],
        "step_time_s": step_time,
        "host_cpu_s": statistics.median(r["host_cpu_s"] for r in records[1:] or records) if records else None,
        "tokens_per_s_per_device": tokens_per_step / step_time / devices if step_time else None,
        "peak_memory_gib": peak,
        "peak_memory_kind": memory,
        "peak_reserved_gib": max((r["peak_reserved_gib"] for r in records if r.get("peak_reserved_gib") is not None),
                                 default=None),
        "predicted_peak_gib": pred_peak,
        "predicted_step_time_s": pred_time,
        "peak_memory_ratio": peak / pred_peak if pred_peak and peak is not None else None,
        "step_time_ratio": step_time / pred_time if pred_time and step_time else None,
        "world_size": world_size,
        "devices": devices,
        "tokens_per_step": tokens_per_step,
        # the busiest EP rank's routed load over the mean (median over steps; absent without EP)
        "ep_imbalance": (statistics.median(r["ep_imbalance"] for r in records if "ep_imbalance" in r)
                         if any("ep_imbalance" in r for r in records) else None),
    }


class MetricsLog:
    """Rank 0's outputs: one JSON line per step, and a live table unless quiet."""

    def __init__(self, path: Path | None, append: bool, live: bool, title: str, predictions: dict | None,
                 memory: str):
        self.path = path
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = path.open("a" if append else "w")
        self.pred_peak, self.pred_time = predicted_values(predictions)
        self.memory = memory
        # On CPU the measured figure is the process's resident set (interpreter and libraries
        # included): a ratio to the predicted model bytes is not a prediction error, so the live
        # outputs show the two side by side instead (the JSON records keep the ratio).
        self.compare_peak = self.pred_peak is not None and memory != "rss_peak"
        if self.pred_peak is not None and not self.compare_peak:
            title += (f"; memory is the process RSS (Python, torch and the model), not comparable with the "
                      f"predicted {self.pred_peak:.3f} GiB of model state and activations")
        self.title = title
        self.rows: list[dict[str, Any]] = []
        self.live = None
        self.console = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self.console = Console()
            if self.console.is_terminal:  # a live table; elsewhere (logs, pipes) one line per step
                self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
                self.live.start()
            else:
                self.console.print(self.title, highlight=False, soft_wrap=True)

    def _table(self):
        from rich.table import Table

        table = Table(title=self.title)
        memory = "process RSS GiB" if self.memory == "rss_peak" else f"peak GiB ({self.memory})"
        for name in ("step", "loss", "grad norm", "lr", "step s", "tokens/s/dev", memory):
            table.add_column(name, justify="right")
        if self.pred_time is not None:
            table.add_column("step / predicted", justify="right")
        if self.compare_peak:
            table.add_column("peak / predicted", justify="right")
        for r in self.rows[-20:]:
            cells = [str(r["step"]), f"{r['loss']:.4f}", f"{r['grad_norm']:.3f}", f"{r['lr']:.2e}",
                     f"{r['step_time_s']:.3f}", f"{r['tokens_per_s_per_device']:.0f}", f"{r['peak_memory_gib']:.2f}"]
            if self.pred_time is not None:
                cells.append(f"{r['step_time_s'] / self.pred_time:.2f}")
            if self.compare_peak:
                cells.append(f"{r['peak_memory_gib'] / self.pred_peak:.2f}")
            table.add_row(*cells)
        return table

    def log(self, record: dict[str, Any]) -> None:
        if self.pred_time is not None:
            record["step_time_ratio"] = record["step_time_s"] / self.pred_time
        if self.pred_peak is not None:
            record["peak_memory_ratio"] = record["peak_memory_gib"] / self.pred_peak
        self.rows.append(record)
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
        elif self.console is not None:
            line = (f"step {record['step']:>6}  loss {record['loss']:.4f}  grad norm {record['grad_norm']:.3f}  "
                    f"lr {record['lr']:.2e}  {record['step_time_s']:.3f} s  "
                    f"{record['tokens_per_s_per_device']:.0f} tok/s/dev  "
                    f"{'rss' if self.memory == 'rss_peak' else 'peak'} {record['peak_memory_gib']:.2f} GiB")
            if "step_time_ratio" in record:
                line += f"  step/pred {record['step_time_ratio']:.2f}"
            if "peak_memory_ratio" in record and self.compare_peak:
                line += f"  peak/pred {record['peak_memory_ratio']:.2f}"
            self.console.print(line, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
            self.console.line()
        if self.handle is not None:
            self.handle.close()
            self.handle = None
