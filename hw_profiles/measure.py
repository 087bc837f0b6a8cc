"""Measure this machine into the numbers a hardware profile holds.

The seed of ``xplan calibrate``: matmul throughput over a sweep of shapes (large ones give the
achievable peak, small ones the per-call overhead), memory-copy bandwidth, fused attention
throughput, and torch.distributed collectives between local processes. ``build_cpu_profile``
turns the measurements into a validated :class:`~xplan.hw_profiles.schema.Profile` whose
``sources`` record the command and the date. Regenerate the shipped ``cpu.yaml`` with::

    python -m xplan.hw_profiles.measure -o hw_profiles/cpu.yaml

Timings use the best of a few repeats of a loop that runs for at least ``min_time`` seconds,
after warm-up, synchronising the device around each loop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .loader import profile_from_dict, save_profile
from .schema import COLLECTIVES, Profile

#: (m, n, k) shapes: square ones up to the size that reaches the machine's peak, and the small
#: and skinny ones that per-expert MoE GEMMs produce.
DEFAULT_GEMM_SHAPES: tuple[tuple[int, int, int], ...] = (
    (32, 32, 32), (64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512),
    (1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 1024),
    (16, 4096, 4096), (64, 1536, 4096), (256, 4096, 1536), (2048, 1536, 4096),
)
QUICK_GEMM_SHAPES: tuple[tuple[int, int, int], ...] = (
    (32, 32, 32), (128, 128, 128), (512, 512, 512), (1024, 1024, 1024), (64, 1536, 4096),
)
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MatmulResult:
    m: int
    n: int
    k: int
    dtype: str
    seconds: float

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12


@dataclass(frozen=True)
class AttentionResult:
    seq_len: int
    fwd_seconds: float
    bwd_seconds: float
    fwd_flops: float

    @property
    def fwd_tflops(self) -> float:
        return self.fwd_flops / self.fwd_seconds / 1e12

    @property
    def bwd_tflops(self) -> float:  # backward = 2.5x the forward FLOPs (FlashAttention convention)
        return 2.5 * self.fwd_flops / self.bwd_seconds / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu", min_time: float = 0.05,
              warmup: int = 2, repeats: int = 3) -> float:
    """Seconds per call of ``fn``: best over ``repeats`` loops of at least ``min_time`` each."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    best = math.inf
    for _ in range(repeats):
        iters = 0
        t0 = time.perf_counter()
        while True:
            fn()
            iters += 1
            if iters >= 1 and (iters & (iters - 1)) == 0:  # check the clock at powers of two
                _sync(dev)
                if time.perf_counter() - t0 >= min_time:
                    break
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def measure_matmul(shapes: Sequence[tuple[int, int, int]], dtype: str = "bf16",
                   device: str | torch.device = "cpu", min_time: float = 0.05) -> list[MatmulResult]:
    """Time ``torch.mm`` of [m, k] x [k, n] into a preallocated output for each shape."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"measure_matmul: dtype {dtype!r} not measurable yet; use one of {list(_TORCH_DTYPES)}")
    tdt = _TORCH_DTYPES[dtype]
    out: list[MatmulResult] = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k in shapes:
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=tdt)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=tdt)
        c = torch.empty(m, n, device=device, dtype=tdt)
        secs = time_call(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device, min_time)
        out.append(MatmulResult(m, n, k, dtype, secs))
    return out


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, device: str | torch.device = "cpu",
                           min_time: float = 0.1, allocations: int = 3) -> float:
    """Device-memory copy bandwidth in bytes/s, counting bytes read plus bytes written (STREAM copy).

    Best over ``allocations`` fresh buffer pairs: on virtual machines the result depends on
    where the buffers land (seen here: 11 vs 24-36 GB/s between allocations).
    """
    best = 0.0
    for _ in range(allocations):
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        secs = time_call(lambda src=src, dst=dst: dst.copy_(src), device, min_time)
        best = max(best, 2.0 * src.numel() * 4 / secs)
        del src, dst
    return best


def measure_attention(seq_lens: Sequence[int], batch: int = 1, heads: int = 8, head_dim: int = 64,
                      dtype: str = "bf16", device: str | torch.device = "cpu",
                      min_time: float = 0.05) -> list[AttentionResult]:
    """Time ``scaled_dot_product_attention`` (non-causal) forward and backward at each length.

    Inputs require grad (the training path); the backward is timed alone with ``autograd.grad``
    on a retained graph.
    """
    tdt = _TORCH_DTYPES[dtype]
    results = []
    for s in seq_lens:
        q, k, v = (torch.randn(batch, heads, s, head_dim, device=device, dtype=tdt, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, s, head_dim, device=device, dtype=tdt)

        def fwd(q=q, k=k, v=v):  # the training path: inputs require grad
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        out = fwd()

        def bwd(q=q, k=k, v=v, out=out, grad=grad):
            return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        t_fwd = time_call(fwd, device, min_time)
        t_bwd = time_call(bwd, device, min_time)
        flops = 4.0 * batch * heads * s * s * head_dim
        results.append(AttentionResult(s, t_fwd, t_bwd, flops))
    return results


# ---------------------------------------------------------------------- collectives (gloo)
def _collective_worker(rank: int, world: int, init_file: str, out_file: str, nbytes: int,
                       min_time: float) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        numel = max(world, nbytes // 4 // world * world)
        full = torch.ones(numel)
        part = torch.ones(numel // world)
        small = torch.ones(1)
        a2a_out = torch.empty(numel)
        p2p = torch.ones(numel)

        # torch 2.13 renamed the tensor forms; older releases only have the *_tensor names
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

        def p2p_pingpong():
            if rank == 0:
                dist.send(p2p, 1)
                dist.recv(p2p, 1)
            elif rank == 1:
                dist.recv(p2p, 0)
                dist.send(p2p, 0)

        ops = {
            "all_gather": lambda: all_gather(full, part),
            "reduce_scatter": lambda: reduce_scatter(part, full),
            "all_reduce": lambda: dist.all_reduce(full),
            "all_to_all": lambda: dist.all_to_all_single(a2a_out, full),
            "p2p": p2p_pingpong,
        }
        res: dict[str, float] = {}
        for kind, fn in ops.items():
            for _ in range(2):
                fn()
            t0 = time.perf_counter()
            fn()
            # rank 0 picks the iteration count so that every rank runs the same number of calls
            iters = torch.tensor([max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))])
            dist.broadcast(iters, 0)
            n_iter = int(iters.item())
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(n_iter):
                fn()
            res[kind] = (time.perf_counter() - t0) / n_iter
        for _ in range(3):
            dist.all_reduce(small)
        iters, t0 = 50, time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(small)
        res["latency_all_reduce_4B"] = (time.perf_counter() - t0) / iters
        res["numel"] = float(numel)
        if rank == 0:
            Path(out_file).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure_collectives(world_size: int = 2, nbytes: int = 32 * 2**20, min_time: float = 0.3) -> dict[str, float]:
    """Bus bandwidth (bytes/s, NCCL convention) of each collective over gloo between local processes.

    Keys: the collective kinds, plus ``latency_s`` (a 4-byte all-reduce divided by its
    2(n-1) ring steps) and ``world_size``.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(_collective_worker, args=(world_size, init_file, out_file, nbytes, min_time),
                 nprocs=world_size, join=True)
        raw = json.loads(Path(out_file).read_text())
    n = world_size
    size = raw["numel"] * 4  # bytes of the full buffer
    busbw = {
        "all_gather": size / raw["all_gather"] * (n - 1) / n,
        "reduce_scatter": size / raw["reduce_scatter"] * (n - 1) / n,
        "all_reduce": size / raw["all_reduce"] * 2 * (n - 1) / n,
        "all_to_all": size / raw["all_to_all"] * (n - 1) / n,
        "p2p": size / (raw["p2p"] / 2),  # a ping-pong is two one-way transfers
    }
    busbw["latency_s"] = raw["latency_all_reduce_4B"] / (2 * (n - 1))
    busbw["world_size"] = float(n)
    return busbw


# ---------------------------------------------------------------------- fits
def fit_gemm_overhead(results: Sequence[MatmulResult], peak_flops: dict[str, float],
                      max_fraction: dict[str, float], mem_bandwidth: float) -> float:
    """Per-call overhead (s) of the profile's GEMM model, by relative least squares (>= 0).

    Model: t = max(F / (peak x max_fraction), bytes / mem_bandwidth) + t0; minimising
    sum((t_model / t_measured - 1)^2) over t0 weights the small GEMMs, where t0 matters.
    """
    in_b = {"bf16": 2, "fp32": 4, "fp8": 1}
    out_b = {"bf16": 2, "fp32": 4, "fp8": 2}
    num = den = 0.0
    for r in results:
        nbytes = (r.m * r.k + r.k * r.n) * in_b[r.dtype] + r.m * r.n * out_b[r.dtype]
        roof = max(r.flops / (peak_flops[r.dtype] * max_fraction[r.dtype]), nbytes / mem_bandwidth)
        num += (1.0 - roof / r.seconds) / r.seconds
        den += 1.0 / r.seconds**2
    return max(0.0, num / den) if den else 0.0


def fit_saturation(xs: Sequence[float], effs: Sequence[float]) -> tuple[float, float]:
    """Fit ``eff = a * x / (x + h)`` (relative least squares over a grid of h); returns (a, h)."""
    best: tuple[float, float, float] | None = None
    top = max(xs)
    grid = [top * i / 400 for i in range(0, 801)]
    for h in grid:
        w = [x / (x + h) if x + h > 0 else 1.0 for x in xs]
        # minimise sum(((a*w - e)/e)^2): a = sum(w/e) / sum(w^2/e^2)
        a = sum(wi / e for wi, e in zip(w, effs, strict=True)) / sum((wi / e) ** 2 for wi, e in zip(w, effs, strict=True))
        err = sum(((a * wi - e) / e) ** 2 for wi, e in zip(w, effs, strict=True))
        if best is None or err < best[0]:
            best = (err, a, h)
    assert best is not None
    return best[1], best[2]


def _best(runs: Sequence[Sequence[MatmulResult]]) -> list[MatmulResult]:
    """Per shape, the fastest of several passes over the same shapes."""
    return [min(rs, key=lambda r: r.seconds) for rs in zip(*runs, strict=True)]


def _sig(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (readable YAML, no false precision)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 1.0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------- the cpu profile
def build_cpu_profile(command: str, quick: bool = False, world_size: int = 2,
                      name: str = "cpu") -> tuple[Profile, str]:
    """Measure this machine and return (profile, header comment)."""
    today = datetime.date.today().isoformat()
    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    min_time = 0.02 if quick else 0.1
    shapes = QUICK_GEMM_SHAPES if quick else DEFAULT_GEMM_SHAPES
    cpu = _cpu_name()
    passes = 1 if quick else 3  # best of several passes: this kind of VM has slow spells
    where = f"`{command}` on {today}, torch {torch.__version__}, {threads} threads, {cores} CPUs ({cpu}), best of {passes} pass(es)"

    copy_bw = measure_copy_bandwidth(64 * 2**20 if quick else 256 * 2**20, min_time=min_time)
    mm = {d: _best([measure_matmul(shapes, d, min_time=min_time) for _ in range(passes)]) for d in ("fp32", "bf16")}
    best = {d: max(mm[d], key=lambda r: r.tflops) for d in mm}
    peak = {d: best[d].tflops * 1e12 for d in mm}
    ones = {d: 1.0 for d in mm}
    overhead = fit_gemm_overhead(mm["fp32"] + mm["bf16"], peak, ones, copy_bw)
    seqs = (64, 128, 256) if quick else (128, 256, 512, 1024)
    att_runs = [measure_attention(seqs, dtype="bf16", min_time=min_time) for _ in range(passes)]
    att = [AttentionResult(rs[0].seq_len, min(r.fwd_seconds for r in rs), min(r.bwd_seconds for r in rs),
                           rs[0].fwd_flops) for rs in zip(*att_runs, strict=True)]
    fa, fh = fit_saturation([r.seq_len for r in att], [r.fwd_tflops * 1e12 / peak["bf16"] for r in att])
    ba, bh = fit_saturation([r.seq_len for r in att], [r.bwd_tflops * 1e12 / peak["bf16"] for r in att])
    coll = measure_collectives(world_size, 8 * 2**20 if quick else 32 * 2**20, 0.1 if quick else 0.3)
    fractions = {k: _sig(min(1.0, max(1e-4, coll[k] / copy_bw))) for k in COLLECTIVES}

    def rows(rs: Sequence[MatmulResult]) -> str:
        return ", ".join(f"{r.m}x{r.n}x{r.k} {r.tflops * 1e3:.3g}" for r in rs)

    data = {
        "schema_version": 1,
        "name": name,
        "description": f"this machine, measured: {cpu}, {cores} CPUs (torch {threads} threads); "
                       "gloo between local processes",
        "device": {
            "kind": "cpu",
            "model": cpu,
            "definition": "one process (rank) on this machine; the peak is one process using all "
                          f"{threads} threads, so k ranks here share it",
            "ranks_per_device": 1,
        },
        "compute": {
            "peak_tflops": {"bf16": _sig(peak["bf16"] / 1e12), "fp8": None, "fp32": _sig(peak["fp32"] / 1e12)},
            "gemm": {"max_fraction": {"bf16": 1.0, "fp8": None, "fp32": 1.0}, "overhead_us": _sig(overhead * 1e6)},
            "attention": {
                "forward": {"max_fraction": _sig(min(1.0, fa)), "half_seq": _sig(fh)},
                "backward": {"max_fraction": _sig(min(1.0, ba)), "half_seq": _sig(bh)},
            },
        },
        "memory": {"hbm_gib": _sig(_ram_gib()), "hbm_tbps": _sig(copy_bw / 1e12), "hbm_fraction": 1.0},
        "host": {"memory_gib": _sig(_ram_gib()), "link_gbps": _sig(copy_bw / 1e9), "link_fraction": 1.0},
        "interconnect": {"levels": [{
            "name": "shm",
            "devices": None,
            "topology": "switch",
            "bandwidth_gbps": _sig(copy_bw / 1e9),
            "latency_us": _sig(coll["latency_s"] * 1e6),
            "fraction": fractions,
        }]},
        "sources": {
            "device.ranks_per_device": "one process per device on a CPU machine",
            "compute.peak_tflops": f"measured: best torch.mm GFLOPS over the shape sweep (MAMF-style; "
                                   f"fp32 {best['fp32'].m}x{best['fp32'].n}x{best['fp32'].k}, bf16 "
                                   f"{best['bf16'].m}x{best['bf16'].n}x{best['bf16'].k}) by {where}",
            "compute.gemm.max_fraction": "1.0 by definition: peak_tflops is the measured best, not a vendor peak",
            "compute.gemm.overhead_us": f"fitted (relative least squares) to the sweep, GFLOPS per m x n x k: "
                                        f"fp32 [{rows(mm['fp32'])}]; bf16 [{rows(mm['bf16'])}]; by {where}",
            "compute.attention": "fitted max*s/(s+half) of bf16 scaled_dot_product_attention (b1 h8 d64, "
                                 "non-causal) vs the bf16 peak, fwd/bwd GFLOPS at seq "
                                 + ", ".join(f"{r.seq_len}: {r.fwd_tflops * 1e3:.3g}/{r.bwd_tflops * 1e3:.3g}"
                                             for r in att) + f"; by {where}",
            "memory.hbm_gib": "physical RAM (os.sysconf SC_PHYS_PAGES x SC_PAGE_SIZE); the cpu 'device memory' is RAM",
            "memory.hbm_tbps": f"measured: tensor copy_ of {'64' if quick else '256'} MiB, read+write bytes/s, by {where}",
            "memory.hbm_fraction": "1.0: hbm_tbps is itself measured",
            "host.memory_gib": "physical RAM: host and device memory are the same RAM here",
            "host.link_gbps": "the measured RAM copy bandwidth (offload is a copy within RAM)",
            "host.link_fraction": "1.0: link_gbps is itself measured",
            "interconnect.levels[0].devices": "null: any number of local processes (gloo over shared memory/loopback)",
            "interconnect.levels[0].bandwidth_gbps": "the measured RAM copy bandwidth (the medium gloo moves data through)",
            "interconnect.levels[0].latency_us": f"measured: 4-byte gloo all_reduce between {world_size} processes "
                                                 f"/ its 2(n-1) steps, by {where}",
            "interconnect.levels[0].fraction": f"measured gloo bus bandwidth / RAM copy bandwidth, {world_size} "
                                               "processes, GB/s: " + ", ".join(
                                                   f"{k} {coll[k] / 1e9:.3g}" for k in COLLECTIVES) + f"; by {where}",
        },
    }
    header = (f"Measured on this machine by `{command}` on {today}.\n"
              "Re-run that command to refresh it; numbers are this machine's, not a vendor's.")
    return profile_from_dict(data, origin="measured cpu profile"), header


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xplan.hw_profiles.measure",
                                     description="Measure this CPU machine into a hardware profile YAML.")
    parser.add_argument("-o", "--output", help="write the profile here (default: print it)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter measurements (seconds)")
    parser.add_argument("--world-size", type=int, default=2, help="processes for the gloo collectives")
    parser.add_argument("--name", default="cpu", help="the profile's name")
    args = parser.parse_args(argv)
    command = "python -m xplan.hw_profiles.measure " + " ".join(sys.argv[1:] if argv is None else argv)
    profile, header = build_cpu_profile(command.strip(), quick=args.quick, world_size=args.world_size,
                                        name=args.name)
    if args.output:
        save_profile(profile, args.output, header=header)
        print(f"wrote {args.output}")
    else:
        print("".join(f"# {line}\n" for line in header.splitlines()) + profile.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
