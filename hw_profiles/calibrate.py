"""`xplan calibrate`: measure this machine into a hardware profile the cost models use.

What is measured (every timing is the median of ``repeats`` loops of at least ``min_time`` s,
after warm-up, with the device synchronised around each loop; the spread is kept):

- **GEMMs**: ``torch.mm`` over a sweep of shapes (square, skinny, small) in the three operand
  layouts a linear layer runs (``x @ W^T`` forward, ``g @ W`` and ``g^T @ x`` backward), with a
  fresh output each call (what eager training does), plus small **grouped** GEMMs (MoE experts)
  through ``torch._grouped_mm`` where the device supports it, else one ``mm`` per expert. The
  profile's per-dtype peak is fitted to the whole sweep with the profile's own GEMM formula.
- **Per-kernel overhead**: a chain of tiny elementwise ops run forward and backward under
  autograd, divided by the number of aten ops it dispatches (counted the way the planner's tracer
  counts them): what one eager kernel costs beyond its bytes (dispatch, autograd, launch).
- **Memory bandwidth**: out-of-place elementwise ops with fresh outputs over a sweep of sizes
  (fitted ``t = bytes / bw``), and a STREAM-style ``copy_`` (reported, and the nominal medium of
  the local interconnect on CPU).
- **Attention**: causal ``scaled_dot_product_attention`` forward and backward over sequence
  lengths, in model FLOPs (causal half, backward = 2 x forward), fitted ``max*s/(s+half)``.
- **Host <-> device**: pinned copies both ways on an accelerator; on CPU host and device are the
  same memory, so the host link is the RAM copy bandwidth (said so in ``sources``).
- **Collectives**: ``all_gather``, ``reduce_scatter``, ``all_reduce``, ``all_to_all`` and
  ``p2p`` through torch.distributed between N local processes (gloo on CPU, nccl on CUDA, hccl on
  Ascend) over a sweep of sizes; per kind an alpha-beta fit (latency per ring step, bus
  bandwidth), and one shared latency for the level.

What one "device" is: one rank of ``xplan run`` with ``processes`` ranks on this machine. On CPU
each rank gets ``threads`` (default ``cores // processes``, what ``xplan run`` gives each spawned
rank; all cores at one process) and the ranks run the compute sweep *concurrently*, so shared
memory bandwidth and caches are measured as a real N-rank run sees them. A profile is therefore
specific to its process count: calibrate with ``--processes N`` for N-rank runs.

Accelerators (CUDA, Ascend NPU) are chosen automatically when present; those paths are short
and kept apart (``_accelerator_*``), and are not exercised on CPU-only machines.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import queue as queue_mod
import re
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from xplan.errors import InputError

from .loader import profile_from_dict
from .schema import COLLECTIVES, Profile

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_IN_BYTES = {"bf16": 2, "fp8": 1, "fp32": 4}
_OUT_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}
DEVICE_TYPES = ("cpu", "cuda", "npu")
Progress = Callable[[int, int, str], None]  # (done, total, label)


# ====================================================================== sweeps
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


# ====================================================================== device and timing
def pick_device(requested: str | None = None) -> str:
    """``cuda`` or ``npu`` when present (or when asked for), else ``cpu``."""
    if requested is not None:
        if requested not in DEVICE_TYPES:
            raise InputError(f"--device must be one of {', '.join(DEVICE_TYPES)}, got {requested!r}")
        if requested != "cpu" and _accelerator_count(requested) == 0:
            raise InputError(f"--device {requested}: this machine has no {requested} device; run without --device "
                             "to measure what is here (cpu)")
        return requested
    for kind in ("cuda", "npu"):
        if _accelerator_count(kind) > 0:
            return kind
    return "cpu"


def _accelerator_count(kind: str) -> int:
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


def _sync(device: torch.device) -> None:
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
    _sync(dev)
    iters, elapsed = 1, 0.0
    while True:  # find an iteration count that takes at least min_time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(dev)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or iters >= 1 << 20:
            break
        iters = min(1 << 20, max(iters * 2, int(iters * min_time / max(elapsed, 1e-9) * 1.2)))
    samples = [elapsed / iters]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(dev)
        samples.append((time.perf_counter() - t0) / iters)
    return Timing(statistics.median(samples), min(samples), max(samples))


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu", min_time: float = 0.05,
              warmup: int = 2, repeats: int = 3) -> float:
    """Median seconds per call of ``fn`` (see ``time_fn``)."""
    return time_fn(fn, device, min_time, warmup, repeats).median


# ====================================================================== results
@dataclass(frozen=True)
class MatmulResult:
    m: int
    n: int
    k: int
    dtype: str
    seconds: float
    groups: int = 1
    layout: str = "nt"
    impl: str = "mm"
    spread: float = 0.0

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.groups

    @property
    def nbytes(self) -> float:
        return self.groups * ((self.m * self.k + self.k * self.n) * _IN_BYTES[self.dtype]
                              + self.m * self.n * _OUT_BYTES[self.dtype])

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12


@dataclass(frozen=True)
class AttentionResult:
    seq_len: int
    fwd_seconds: float
    bwd_seconds: float
    fwd_flops: float  # model FLOPs of the forward (causal: half the dense count)
    dtype: str = "bf16"

    @property
    def fwd_tflops(self) -> float:
        return self.fwd_flops / self.fwd_seconds / 1e12

    @property
    def bwd_tflops(self) -> float:  # backward = 2 x the forward's model FLOPs (no kernel recompute)
        return 2.0 * self.fwd_flops / self.bwd_seconds / 1e12


# ====================================================================== compute measurements
def _operands(m: int, n: int, k: int, layout: str, dtype: torch.dtype, device, gen) -> tuple[torch.Tensor, ...]:
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    a = rand(m, k) if layout[0] == "n" else rand(k, m).t()
    b = rand(k, n) if layout[1] == "n" else rand(n, k).t()
    return a, b


def measure_matmul(shapes: Sequence[tuple[int, int, int]], dtype: str = "bf16",
                   device: str | torch.device = "cpu", min_time: float = 0.05, layouts: Sequence[str] = ("nt",),
                   repeats: int = 3) -> list[MatmulResult]:
    """Time ``a @ b`` (fresh output) for each shape and operand layout (``nt``: b transposed)."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"measure_matmul: dtype {dtype!r} not measurable; use one of {list(_TORCH_DTYPES)}")
    gen = torch.Generator().manual_seed(0)
    out = []
    for m, n, k in shapes:
        for layout in layouts:
            a, b = _operands(m, n, k, layout, _TORCH_DTYPES[dtype], device, gen)
            t = time_fn(lambda a=a, b=b: torch.mm(a, b), device, min_time, repeats=repeats)
            out.append(MatmulResult(m, n, k, dtype, t.median, layout=layout, spread=t.spread))
    return out


def grouped_mm_works(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward here for this dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(32, 16, device=device, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
        return True
    except Exception:  # noqa: BLE001 - unsupported device/dtype/arch
        return False


def measure_grouped(shapes: Sequence[tuple[int, int, int, int]], dtype: str = "bf16",
                    device: str | torch.device = "cpu", min_time: float = 0.05,
                    repeats: int = 3) -> list[MatmulResult]:
    """Time one grouped expert GEMM per shape (groups, rows per group, n, k): ``x [g*r, k]`` times
    ``W [g, n, k]^T`` with ``torch._grouped_mm``, or one ``mm`` per group where unsupported."""
    tdt = _TORCH_DTYPES[dtype]
    grouped = grouped_mm_works(device, tdt)
    gen = torch.Generator().manual_seed(1)
    out = []
    for g, r, n, k in shapes:
        x = torch.randn(g * r, k, generator=gen).to(device=device, dtype=tdt)
        w = torch.randn(g, n, k, generator=gen).to(device=device, dtype=tdt)
        if grouped:
            offs = torch.arange(1, g + 1, device=device, dtype=torch.int32) * r
            fn = lambda x=x, w=w, offs=offs: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # noqa: E731
        else:
            fn = lambda x=x, w=w, g=g: torch.cat([c @ w[e].t() for e, c in enumerate(x.chunk(g))])  # noqa: E731
        t = time_fn(fn, device, min_time, repeats=repeats)
        out.append(MatmulResult(r, n, k, dtype, t.median, groups=g, impl="grouped_mm" if grouped else "loop",
                                spread=t.spread))
    return out


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, device: str | torch.device = "cpu",
                           min_time: float = 0.1, allocations: int = 3, repeats: int = 3) -> float:
    """STREAM-copy bandwidth (bytes read + written per second) of ``dst.copy_(src)``.

    Median over ``allocations`` fresh buffer pairs: on virtual machines the result depends on
    where the buffers land.
    """
    values = []
    for _ in range(allocations):
        src = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t = time_fn(lambda src=src, dst=dst: dst.copy_(src), device, min_time, repeats=repeats)
        values.append(2.0 * src.numel() * 4 / t.median)
        del src, dst
    return statistics.median(values)


def measure_elementwise(sizes_mib: Sequence[float], device: str | torch.device = "cpu",
                        min_time: float = 0.05, repeats: int = 3) -> list[dict[str, float]]:
    """Out-of-place fp32 ``a * b`` and ``a + 1`` with a fresh output (what eager ops do), per size.

    Returns records with ``bytes`` (read + written) and ``seconds``.
    """
    out = []
    for mib in sizes_mib:
        numel = max(1, int(mib * 2**20) // 4)
        a = torch.rand(numel, device=device)
        b = torch.rand(numel, device=device)
        for op, fn, nbytes in (("mul", lambda a=a, b=b: a * b, 12 * numel), ("add_scalar", lambda a=a: a + 1.0,
                                                                              8 * numel)):
            t = time_fn(fn, device, min_time, repeats=repeats)
            out.append({"op": op, "mib": mib, "bytes": float(nbytes), "seconds": t.median, "spread": t.spread})
        del a, b
    return out


def _count_kernels(fn: Callable[[], Any]) -> int:
    """Aten ops ``fn`` dispatches that produce new tensors (views and aliases excluded): the ops
    the planner's tracer records and the cost model prices one by one."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.prim.device.default or func.is_view:
                return out
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            ins = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            mutable = func._schema.is_mutable
            if outs and (mutable or not ins or any(t.untyped_storage()._cdata not in ins for t in outs)):
                Counter.count += 1
            return out

    with Counter():
        fn()
    return Counter.count


def _tiny_block_step(tokens: int, hidden: int, device, heads: int = 4) -> Callable[[], None]:
    """One training step (forward + backward) of a tiny pre-norm decoder block written the way
    eager model code is: RMSNorm, q/k/v projections, rotary-style elementwise ops, causal SDPA
    with head reshapes and transposes, output projection, residual, RMSNorm, SwiGLU MLP."""
    nn = torch.nn
    d = hidden // heads

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    lin = {name: nn.Linear(i, o, bias=False, device=device) for name, i, o in (
        ("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden), ("o", hidden, hidden),
        ("gate", hidden, 2 * hidden), ("up", hidden, 2 * hidden), ("down", 2 * hidden, hidden))}
    w1, w2 = (torch.ones(hidden, device=device, requires_grad=True) for _ in range(2))
    x0 = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    cos = torch.randn(tokens, d, device=device)
    sin = torch.randn(tokens, d, device=device)

    def rope(t):  # [1, heads, tokens, d]
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def step():
        h = rms(x0, w1)
        q, k, v = (lin[n](h).view(1, tokens, heads, d).transpose(1, 2) for n in ("q", "k", "v"))
        a = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x0 + lin["o"](a.transpose(1, 2).reshape(1, tokens, hidden))
        h = rms(x, w2)
        x = x + lin["down"](torch.nn.functional.silu(lin["gate"](h)) * lin["up"](h))
        x.sum().backward()

    return step


def measure_kernel_overhead(numels: Sequence[int] = (16, 256, 2048), device: str | torch.device = "cpu",
                            min_time: float = 0.05, repeats: int = 3, depth: int = 16) -> list[dict[str, float]]:
    """Seconds per aten kernel of tiny training steps (forward and backward under autograd), where
    bytes and FLOPs are negligible, divided by the kernels counted the tracer's way (views and
    aliases excluded). Two workloads per size:

    - ``block``: a tiny decoder block as eager model code runs it (``_tiny_block_step``; its
      views, reshapes and module calls are paid per counted kernel, as in a real step);
    - ``chain``: ``depth`` RMSNorm/SwiGLU-like elementwise stages on ``[8, numel/8]`` (the bare
      per-op cost of dispatch and autograd).
    """
    device = torch.device(device)
    out = []
    blocks_done: set[int] = set()
    for numel in numels:
        cols = max(1, numel // 8)
        x0 = torch.randn(8, cols, device=device, requires_grad=True)
        w = torch.randn(cols, device=device, requires_grad=True)

        def chain(x0=x0, w=w):
            y = x0
            for _ in range(depth):
                y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
                y = y * torch.sigmoid(y) + y
            y.sum().backward()

        tokens = 4 if numel < 512 else 16  # tiny: the block's GEMMs cost no more than their launch
        block = _tiny_block_step(tokens, 32, device)
        for kind, fn in (("block", block), ("chain", chain)):
            if kind == "block" and tokens in blocks_done:
                continue
            blocks_done.add(tokens)
            kernels = _count_kernels(fn)
            t = time_fn(fn, device, min_time, repeats=repeats)
            out.append({"kind": kind, "numel": float(numel if kind == "chain" else tokens * 32),
                        "kernels": float(kernels), "seconds": t.median, "seconds_per_kernel": t.median / kernels,
                        "spread": t.spread})
    return out


def measure_attention(seq_lens: Sequence[int], batch: int = 1, heads: int = 8, head_dim: int = 64,
                      dtype: str = "bf16", device: str | torch.device = "cpu", min_time: float = 0.05,
                      repeats: int = 3, causal: bool = True) -> list[AttentionResult]:
    """Causal ``scaled_dot_product_attention`` forward and backward (inputs require grad; the
    backward timed alone on a retained graph). FLOPs are model FLOPs: the forward's 4*b*h*s*s*d
    halved by the causal mask, the backward twice the forward."""
    tdt = _TORCH_DTYPES[dtype]
    results = []
    for s in seq_lens:
        q, k, v = (torch.randn(batch, heads, s, head_dim, device=device, dtype=tdt, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, s, head_dim, device=device, dtype=tdt)

        def fwd(q=q, k=k, v=v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        out = fwd()

        def bwd(q=q, k=k, v=v, out=out, grad=grad):
            return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        t_fwd = time_fn(fwd, device, min_time, repeats=repeats).median
        t_bwd = time_fn(bwd, device, min_time, repeats=repeats).median
        flops = 4.0 * batch * heads * s * s * head_dim * (0.5 if causal else 1.0)
        results.append(AttentionResult(s, t_fwd, t_bwd, flops, dtype))
    return results


def _accelerator_host_link(device: torch.device, nbytes: int, min_time: float, repeats: int) -> dict[str, float]:
    """Pinned host <-> device copy bandwidth, bytes/s per direction."""
    host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    h2d = time_fn(lambda: dev.copy_(host, non_blocking=True), device, min_time, repeats=repeats).median
    d2h = time_fn(lambda: host.copy_(dev, non_blocking=True), device, min_time, repeats=repeats).median
    return {"h2d": nbytes / h2d, "d2h": nbytes / d2h}


# ====================================================================== collectives
def _collective_ops(world: int, rank: int, nbytes: int, device) -> dict[str, tuple[Callable[[], Any], float]]:
    """{kind: (call, nbytes in collective_time's convention)} for a message of about ``nbytes``."""
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
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
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
        _sync(dev)
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


# ====================================================================== fits
def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Least squares ``a x ~ b`` (small, dense; float64)."""
    sol = torch.linalg.lstsq(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)[:, None])
    return [float(v) for v in sol.solution[:, 0]]


def _gemm_model(r: MatmulResult, peak: float, bw: float, overhead: float) -> float:
    return max(r.flops / peak, r.nbytes / bw) + overhead


def fit_gemm_peak(results: Sequence[MatmulResult], bw: float, overhead: float) -> float:
    """FLOP/s that makes the profile's GEMM formula (max(FLOPs / peak, bytes / bw) + overhead) fit
    the sweep best (relative least squares over a log grid from 0.2x to 1.5x the best shape).

    Shapes whose measured time is under 4x ``overhead`` are left out when others remain: there
    the per-kernel overhead of eager training (autograd, module code) exceeds what a bare GEMM
    loop pays per call (on accelerators the launches overlap), and they say nothing about the peak.
    """
    big = [r for r in results if r.seconds >= 4 * overhead] or list(results)
    best = max(r.flops / max(r.seconds - overhead, r.seconds * 0.05) for r in big)
    grid = [best * 0.2 * (7.5 ** (i / 400)) for i in range(401)]

    def err(p):
        return sum((_gemm_model(r, p, bw, overhead) / r.seconds - 1.0) ** 2 for r in big)

    return min(grid, key=err)


def fit_gemm_overhead(results: Sequence[MatmulResult], peak_flops: dict[str, float],
                      max_fraction: dict[str, float], mem_bandwidth: float) -> float:
    """Per-call overhead (s) of the GEMM formula fitted by relative least squares (>= 0)."""
    num = den = 0.0
    for r in results:
        roof = max(r.flops / (peak_flops[r.dtype] * max_fraction[r.dtype]), r.nbytes / mem_bandwidth)
        num += (1.0 - roof / r.seconds) / r.seconds
        den += 1.0 / r.seconds**2
    return max(0.0, num / den) if den else 0.0


def fit_bandwidth(records: Sequence[dict[str, float]], overhead: float = 0.0) -> float:
    """bytes/s of ``t = overhead + bytes / bw`` fitted in log space (least squares of log(t_model /
    t)): the geometric mean of the per-size bandwidths, so cache-resident and DRAM-sized points
    weigh alike."""
    logs = [math.log(r["bytes"] / max(r["seconds"] - overhead, r["seconds"] * 0.05)) for r in records]
    return math.exp(sum(logs) / len(logs))


def fit_saturation(xs: Sequence[float], effs: Sequence[float], cap: float = math.inf) -> tuple[float, float]:
    """Fit ``eff = a * x / (x + h)`` with ``a <= cap`` (relative least squares over a grid of h from
    0 to 8x the largest x); returns (a, h)."""
    best: tuple[float, float, float] | None = None
    top = max(xs)
    for h in (top * i / 400 for i in range(0, 3201)):
        w = [x / (x + h) if x + h > 0 else 1.0 for x in xs]
        a = (sum(wi / e for wi, e in zip(w, effs, strict=True))
             / sum((wi / e) ** 2 for wi, e in zip(w, effs, strict=True)))
        a = min(a, cap)
        err = sum(((a * wi - e) / e) ** 2 for wi, e in zip(w, effs, strict=True))
        if best is None or err < best[0]:
            best = (err, a, h)
    assert best is not None
    return best[1], best[2]


def collective_terms(kind: str, nbytes: float, n: int) -> tuple[float, float]:
    """(ring steps, per-device traffic bytes) of one collective, as ``cost_models.kernels.collective_terms``."""
    if kind == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n * nbytes
    if kind == "p2p":
        return 1.0, nbytes
    return float(n - 1), (n - 1) / n * nbytes


def fit_collectives(records: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Alpha-beta fits, relative least squares (rows weighted by 1/t).

    Per kind: t = steps x alpha_k + traffic / B_k. Shared: one alpha for all kinds with a B per
    kind (the profile has one latency per level). Returns {"per_kind": {k: (alpha, B)},
    "latency_s": alpha, "busbw": {k: B}}.
    """
    kinds = [k for k in COLLECTIVES if any(r["kind"] == k for r in records)]
    per_kind = {}
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        a, b = [], []
        for r in rows:
            steps, traffic = collective_terms(kind, r["bytes"], int(r["world"]))
            a.append([steps / r["seconds"], traffic / r["seconds"]])
            b.append(1.0)
        alpha, inv_bw = _solve(a, b) if len(rows) > 1 else (0.0, 0.0)
        if inv_bw <= 0 or alpha < 0:  # latency-dominated (or one size): alpha 0, B from the largest message
            big = max(rows, key=lambda r: r["bytes"])
            alpha, inv_bw = 0.0, big["seconds"] / collective_terms(kind, big["bytes"], int(big["world"]))[1]
        per_kind[kind] = (alpha, 1.0 / inv_bw)
    a, b = [], []
    for r in records:
        steps, traffic = collective_terms(r["kind"], r["bytes"], int(r["world"]))
        row = [steps / r["seconds"]] + [traffic / r["seconds"] if r["kind"] == k else 0.0 for k in kinds]
        a.append(row)
        b.append(1.0)
    sol = _solve(a, b)
    alpha = max(sol[0], 0.0)
    busbw = {}
    for i, kind in enumerate(kinds):
        inv = sol[i + 1]
        if inv <= 0:  # latency-dominated everywhere: bandwidth from the largest message alone
            big = max((r for r in records if r["kind"] == kind), key=lambda r: r["bytes"])
            steps, traffic = collective_terms(kind, big["bytes"], int(big["world"]))
            inv = max(big["seconds"] - steps * alpha, big["seconds"] * 0.05) / traffic
        busbw[kind] = 1.0 / inv
    return {"per_kind": per_kind, "latency_s": alpha, "busbw": busbw}


def _sig(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (readable YAML, no false precision)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


# ====================================================================== orchestration
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
        tasks.append(("host link", lambda: {"host_link": _accelerator_host_link(device, sw.copy_mib * 2**20 // 4,
                                                                                mt, rep)}))
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


def _backend(device_type: str) -> str:
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device_type]


def _worker(rank: int, setup: Setup, world: int, compute: bool, init_file: str, out_dir: str, progress_queue) -> None:
    """A spawned rank: the compute sweep (all ranks at once, aligned by barriers), then collectives."""
    import torch.distributed as dist

    if setup.device == "npu":
        import torch_npu  # noqa: F401
    if setup.device == "cpu":
        torch.set_num_threads(setup.threads)
    device = _device_for(setup.device, rank)
    dist.init_process_group(_backend(setup.device), init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
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
    finally:
        dist.destroy_process_group()


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
    can_collect = setup.collectives and (setup.device == "cpu" or _accelerator_count(setup.device) >= coll_world)
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


# ====================================================================== the profile
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
    return platform.processor() or platform.machine() or "CPU"


def _device_name(device_type: str) -> str:
    if device_type == "cpu":
        return _cpu_name()
    try:
        return getattr(torch, device_type).get_device_name(0)
    except Exception:  # noqa: BLE001
        return device_type


def default_name(device_type: str) -> str:
    if device_type == "cpu":
        return "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", _device_name(device_type).lower()).strip("-")
    return slug or device_type


@dataclass
class Calibration:
    profile: Profile
    header: str
    measurements: dict[str, Any]
    fits: dict[str, Any] = field(default_factory=dict)

    def yaml_text(self) -> str:
        return "".join(f"# {line}".rstrip() + "\n" for line in self.header.splitlines()) + self.profile.to_yaml()

    def summary(self) -> dict[str, Any]:
        p = self.profile
        lv = p.interconnect.levels[0]
        return {
            "name": p.name,
            "device": p.device.model,
            "processes": self.fits["processes"],
            "threads": self.fits["threads"],
            "peak_tflops": {d: getattr(p.compute.peak_tflops, d) for d in ("fp32", "bf16", "fp8")},
            "kernel_overhead_us": p.compute.gemm.overhead_us,
            "memory_gbps": p.memory.hbm_tbps * p.memory.hbm_fraction * 1e3,
            "copy_gbps": self.fits["copy_gbps"],
            "host_link_gbps": p.host.link_gbps * p.host.link_fraction,
            "attention_fraction": {"forward": p.compute.attention.forward.max_fraction,
                                   "backward": p.compute.attention.backward.max_fraction},
            "collective_busbw_gbps": {k: lv.bandwidth_gbps * getattr(lv.fraction, k) for k in COLLECTIVES},
            "collective_latency_us": lv.latency_us,
        }


def build_profile(data: dict[str, Any], setup: Setup, name: str, command: str = "xplan calibrate",
                  host: str | None = None, date: str | None = None) -> Calibration:
    """Fit the measurements into a validated profile whose every number names its measurement."""
    host = host or socket.gethostname() or "localhost"
    date = date or datetime.date.today().isoformat()
    cpu = setup.device == "cpu"
    model = _device_name(setup.device)
    cores = os.cpu_count() or 1
    n = setup.processes
    ranks = f"{n} process{'es' if n > 1 else ''}" + (f" x {setup.threads} thread(s)" if cpu else "")
    where = (f"`{command}` ({ranks}, {'custom' if setup.custom_sweep else 'quick' if setup.quick else 'full'} sweep, median of "
             f"{setup.sweep.repeats} repeats, torch {torch.__version__})")

    def src(what: str) -> str:
        return f"measured by xplan calibrate on {host} {date}: {what}; {where}"

    # per-kernel overhead: tiny autograd chain, seconds per counted kernel (median over sizes)
    over = data["overhead"]
    overhead = statistics.median(r["seconds_per_kernel"] for r in over if r.get("kind", "block") == "block")
    # memory bandwidth: out-of-place elementwise ops with fresh outputs
    elem = data["elementwise"]
    mem_bw = fit_bandwidth(elem)
    copy_bw = data["copy_bw"]
    # GEMMs: per dtype, the peak that fits the sweep with the formula's bytes and overhead
    gemms = [MatmulResult(**r) for r in data["gemm"]]
    peaks: dict[str, float | None] = {"fp8": None}
    for d in ("fp32", "bf16"):
        rs = [r for r in gemms if r.dtype == d]
        peaks[d] = fit_gemm_peak(rs, mem_bw, overhead) if rs else None
    if peaks["bf16"] is None:
        raise InputError("calibration measured no bf16 GEMMs; the profile needs a bf16 peak")
    # attention: efficiency vs the dtype peak of the runs this device makes (fp32 on CPU)
    att_dtype = "fp32" if cpu and peaks.get("fp32") else "bf16"
    att = [AttentionResult(**r) for r in data["attention"] if r["dtype"] == att_dtype]
    peak_att = peaks[att_dtype]
    seqs = [r.seq_len for r in att]

    def eff(flops: float, t: float) -> float:
        return flops / (max(t - overhead, t * 0.05) * peak_att)

    fa, fh = fit_saturation(seqs, [eff(r.fwd_flops, r.fwd_seconds) for r in att], cap=1.0)
    ba, bh = fit_saturation(seqs, [eff(2 * r.fwd_flops, r.bwd_seconds) for r in att], cap=1.0)
    # host link
    if cpu:
        link_bw = copy_bw
    else:
        link_bw = min(data["host_link"]["h2d"], data["host_link"]["d2h"])
    # collectives
    coll = data.get("collectives") or []
    world = int(data.get("collective_world") or 0)
    if coll:
        cf = fit_collectives(coll)
        nominal = max([copy_bw, *cf["busbw"].values()]) if cpu else max(cf["busbw"].values())
        fractions = {k: _sig(min(1.0, max(1e-4, cf["busbw"][k] / nominal))) for k in COLLECTIVES}
        latency = cf["latency_s"]
    else:
        cf = None
        nominal, latency = link_bw, 0.0
        fractions = {k: 1.0 for k in COLLECTIVES}

    if cpu:
        ram = _ram_gib()
        hbm_gib = host_gib = ram / n
        mem_note = f"physical RAM {ram:.1f} GiB / {n} process(es): the ranks share it"
        host_note = "the same RAM as device memory on CPU (host and device are one memory)"
    else:
        hbm_gib = getattr(torch, setup.device).get_device_properties(0).total_memory / 2**30
        host_gib = _ram_gib() / max(1, n)
        mem_note = f"total_memory of {model} from torch.{setup.device}.get_device_properties"
        host_note = f"physical RAM {_ram_gib():.1f} GiB / {n} device(s)"

    def rows(rs: Sequence[MatmulResult]) -> str:
        return ", ".join(f"{r.groups}x" * (r.groups > 1) + f"{r.m}x{r.n}x{r.k}{'' if r.layout == 'nt' else r.layout}"
                         f" {r.tflops * 1e3:.3g}" for r in rs)

    threads_note = (f"one process with {setup.threads} of the {cores} CPU threads"
                    + (f", {n} such ranks running at once" if n > 1 else "") if cpu else f"one {model}")
    ranks_note = f"one rank of `xplan run` with {n} process{'es' if n > 1 else ''} on this machine: {threads_note}"
    profile_data = {
        "schema_version": 1,
        "name": name,
        "description": (f"{model}, measured by xplan calibrate on {host} {date} for {n}-process runs"
                        + (f" ({setup.threads} thread(s) per process of {cores})" if cpu else "")
                        + (f"; {_backend(setup.device)} collectives between {world} local processes" if coll
                           else "; no collectives measured (one device)")),
        "device": {"kind": "cpu" if cpu else ("npu" if setup.device == "npu" else "gpu"), "model": model,
                   "definition": ranks_note, "ranks_per_device": 1},
        "compute": {
            "peak_tflops": {d: (_sig(peaks[d] / 1e12) if peaks.get(d) else None) for d in ("bf16", "fp8", "fp32")},
            "gemm": {"max_fraction": {d: (1.0 if peaks.get(d) else None) for d in ("bf16", "fp8", "fp32")},
                     "overhead_us": _sig(overhead * 1e6)},
            "attention": {
                "forward": {"max_fraction": _sig(min(1.0, fa)), "half_seq": _sig(fh)},
                "backward": {"max_fraction": _sig(min(1.0, ba)), "half_seq": _sig(bh)},
            },
        },
        "memory": {"hbm_gib": _sig(hbm_gib), "hbm_tbps": _sig(mem_bw / 1e12), "hbm_fraction": 1.0},
        "host": {"memory_gib": _sig(host_gib), "link_gbps": _sig(link_bw / 1e9), "link_fraction": 1.0},
        "interconnect": {"levels": [{
            "name": "local",
            "devices": None,
            "topology": "switch",
            "bandwidth_gbps": _sig(nominal / 1e9),
            "latency_us": _sig(latency * 1e6),
            "fraction": fractions,
        }]},
    }
    gemm_by_dtype = {d: [r for r in gemms if r.dtype == d] for d in ("fp32", "bf16")}
    impls = sorted({r.impl for r in gemms if r.groups > 1})
    sources = {
        "device.ranks_per_device": "one process (rank) per device on this machine",
        "compute.peak_tflops": src(
            "per dtype, the FLOP/s that fits max(FLOPs/peak, bytes/bw) + overhead_us best (relative least squares) "
            "to the GEMM sweep (shapes faster than 4 x overhead_us left out), GFLOPS per m x n x k (layout nt = x @ W^T unless marked; GxMxNxK = grouped over G "
            f"experts with {', '.join(impls) or 'no grouped GEMM'}): "
            + "; ".join(f"{d} [{rows(rs)}]" for d, rs in gemm_by_dtype.items() if rs)
            + "; fp8: not measured (null)"),
        "compute.gemm.max_fraction": "1.0 by definition: peak_tflops is itself fitted to measured GEMMs",
        "compute.gemm.overhead_us": src(
            "seconds per aten kernel (counted as the tracer counts them: views excluded) of the forward+backward of "
            "a tiny decoder block in eager model code, median over sizes: "
            + ", ".join(f"{int(r['numel'])} elements {r['seconds_per_kernel'] * 1e6:.3g} us ({int(r['kernels'])} "
                        "kernels)" for r in over if r.get("kind", "block") == "block")
            + "; bare elementwise chain under autograd for comparison: "
            + ", ".join(f"{int(r['numel'])} elements {r['seconds_per_kernel'] * 1e6:.3g} us" for r in over
                        if r.get("kind") == "chain")),
        "compute.attention": src(
            f"fitted max*s/(s+half) to causal scaled_dot_product_attention in {att_dtype} (b{setup.sweep.attention_shape[0]}"
            f" h{setup.sweep.attention_shape[1]} d{setup.sweep.attention_shape[2]}; model FLOPs: causal half, backward 2x"
            f" forward; minus overhead_us) vs the {att_dtype} peak, fwd/bwd GFLOPS at seq "
            + ", ".join(f"{r.seq_len}: {r.fwd_tflops * 1e3:.3g}/{r.bwd_tflops * 1e3:.3g}" for r in att)
            + (" (the cost model applies one efficiency to every dtype; bf16 GFLOPS "
               + ", ".join(f"{r['seq_len']}: {r['fwd_flops'] / r['fwd_seconds'] / 1e9:.3g}/"
                           f"{2 * r['fwd_flops'] / r['bwd_seconds'] / 1e9:.3g}"
                           for r in data["attention"] if r["dtype"] == "bf16") + ")" if cpu else "")),
        "memory.hbm_gib": mem_note,
        "memory.hbm_tbps": src(
            "bytes/s fitted (log space: geometric mean) to out-of-place fp32 elementwise ops with fresh outputs "
            "(read + written bytes), "
            + ", ".join(f"{r['op']} {r['mib']:g} MiB {r['bytes'] / r['seconds'] / 1e9:.3g} GB/s" for r in elem)
            + f"; STREAM copy_ of {setup.sweep.copy_mib} MiB: {copy_bw / 1e9:.3g} GB/s"),
        "memory.hbm_fraction": "1.0: hbm_tbps is itself measured",
        "host.memory_gib": host_note,
        "host.link_gbps": (src(f"on CPU host and device are the same memory: the host link is a RAM copy, the STREAM "
                               f"copy_ bandwidth of {setup.sweep.copy_mib} MiB ({copy_bw / 1e9:.3g} GB/s)") if cpu else
                           src(f"pinned copies of {setup.sweep.copy_mib // 4} MiB, the slower direction (host->device "
                               f"{data['host_link']['h2d'] / 1e9:.3g} GB/s, device->host "
                               f"{data['host_link']['d2h'] / 1e9:.3g} GB/s)")),
        "host.link_fraction": "1.0: link_gbps is itself measured",
        "interconnect.levels[0].devices": "null: any number of local processes",
    }
    if cf is not None:
        per = cf["per_kind"]
        sources["interconnect.levels[0].bandwidth_gbps"] = src(
            ("nominal = the largest of the STREAM copy bandwidth (the memory gloo moves data through) and the fitted "
             "bus bandwidths" if cpu else "nominal = the best fitted bus bandwidth")
            + f" ({nominal / 1e9:.3g} GB/s)")
        sources["interconnect.levels[0].latency_us"] = src(
            f"alpha of one alpha-beta fit over every kind and size ({_backend(setup.device)}, {world} processes; "
            "t = ring steps x alpha + traffic / busbw_kind, relative least squares)")
        sources["interconnect.levels[0].fraction"] = src(
            f"fitted bus bandwidth per kind / the nominal bandwidth, {_backend(setup.device)} between {world} "
            f"processes, sizes {', '.join(f'{k} KiB' for k in setup.sweep.collective_kib)}; per kind alone: "
            + ", ".join(f"{k} {per[k][1] / 1e9:.3g} GB/s + {per[k][0] * 1e6:.3g} us/step" for k in per))
    else:
        for key in ("bandwidth_gbps", "latency_us", "fraction"):
            sources[f"interconnect.levels[0].{key}"] = (
                "assumed: no collectives measured (a single device); a one-device job never communicates, and "
                "these are the host-link bandwidth and zero latency")
    profile_data["sources"] = sources
    header = (f"Measured on this machine by `{command}` on {date} ({host}).\n"
              f"One device = {ranks_note}.\n"
              "Re-run that command to refresh it; numbers are this machine's, not a vendor's.")
    fits = {"processes": n, "threads": setup.threads, "device": setup.device, "kernel_overhead_s": overhead,
            "memory_bw": mem_bw, "copy_gbps": copy_bw / 1e9, "peak_flops": peaks,
            "attention_dtype": att_dtype, "collectives": cf}
    profile = profile_from_dict(profile_data, origin="calibrated profile")
    return Calibration(profile, header, data, fits)


def calibrate(processes: int = 2, threads: int | None = None, quick: bool = False, device: str | None = None,
              name: str | None = None, command: str = "xplan calibrate", progress: Progress | None = None,
              collectives: bool = True, sweep: Sweep | None = None) -> Calibration:
    """Measure this machine (see the module docstring) and return the fitted profile.

    ``processes``: ranks the profile is for (see the module docstring); ``threads``: torch threads
    per process on CPU (default cores // processes); ``quick``: the reduced sweep; ``device``:
    cpu | cuda | npu (default: an accelerator if present); ``sweep``: a custom :class:`Sweep`.
    """
    if processes < 1:
        raise InputError(f"--processes must be at least 1, got {processes}")
    device_type = pick_device(device)
    if device_type != "cpu" and processes > _accelerator_count(device_type):
        raise InputError(f"--processes {processes} needs {processes} {device_type} devices but this machine has "
                         f"{_accelerator_count(device_type)}; use fewer processes")
    cores = os.cpu_count() or 1
    if threads is None:
        threads = max(1, cores // processes) if device_type == "cpu" else 1
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"--name {name!r} must be a simple name of letters, digits, '.', '_' or '-'")
    setup = Setup(device=device_type, processes=processes, threads=threads, quick=quick, collectives=collectives,
                  custom_sweep=sweep)
    data = measure(setup, progress)
    return build_profile(data, setup, name or default_name(device_type), command)
