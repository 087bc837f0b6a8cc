"""The compute measurements of a calibration, each a plain function of (sizes, dtype, device):
GEMMs (plain and grouped), memory bandwidth (elementwise ops and a STREAM copy), the per-kernel
overhead of eager training, fused attention, and the host link of an accelerator."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .timing import time_fn

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MatmulResult:
    """One timed GEMM call: ``groups`` GEMMs of [m, k] x [k, n] (operand ``layout``, ``impl``)."""

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
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12


@dataclass(frozen=True)
class AttentionResult:
    """Causal attention timed forward and backward at one sequence length."""

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


def measure_host_link(device: torch.device, nbytes: int, min_time: float, repeats: int) -> dict[str, float]:
    """Pinned host <-> device copy bandwidth, bytes/s per direction."""
    host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    h2d = time_fn(lambda: dev.copy_(host, non_blocking=True), device, min_time, repeats=repeats).median
    d2h = time_fn(lambda: host.copy_(dev, non_blocking=True), device, min_time, repeats=repeats).median
    return {"h2d": nbytes / h2d, "d2h": nbytes / d2h}

