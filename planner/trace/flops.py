"""FLOPs and bytes of one aten op, from its arguments' shapes (works on fake and meta tensors).

Matmuls (mm, addmm, bmm, baddbmm, scaled mm) and the fused attention kernels torch's flop counter
knows use `torch.utils.flop_counter`'s formulas; the ops it does not know but the runtime runs are
added here with the same conventions (2 FLOPs per multiply-add):
- `_grouped_mm` (the dropless MoE expert GEMM): 2 x rows x K x N summed over groups, which for a
  dropless layer is independent of how tokens are distributed over experts;
- `_scaled_dot_product_flash_attention_for_cpu` and any other SDPA-family op with `query`,
  `key`, `value` arguments: the dense (unmasked) count, forward 2 bmm, backward 4 bmm.

Causal masking is applied by the caller (`attention_fraction`), not here: torch counts SDPA as if
every query saw every key. torch's SDPA backward also counts the scores a fused kernel recomputes
(`kernel_recompute_flops`); model FLOPs leave them out.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

MATMUL_PACKETS = frozenset(
    p for p in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, getattr(aten, "_scaled_mm", None)) if p is not None
)
BATCHED_MATMUL_PACKETS = frozenset((aten.bmm, aten.baddbmm))
GROUPED_MM_PACKETS = frozenset(
    p for p in (getattr(aten, "_grouped_mm", None), getattr(aten, "_scaled_grouped_mm", None)) if p is not None
)


def _schema_names(func) -> list[str]:
    return [a.name for a in func._schema.arguments]


def arg(func, args: tuple, kwargs: dict, name: str, default=None):
    """An argument of an aten op by its schema name, positional or keyword."""
    if name in kwargs:
        return kwargs[name]
    names = _schema_names(func)
    if name in names:
        i = names.index(name)
        if i < len(args):
            return args[i]
    return default


def is_sdpa(func) -> bool:
    names = _schema_names(func)
    return "query" in names and "key" in names and "value" in names


def grouped_mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    """FLOPs of `torch._grouped_mm(a, b, offs)` for the four layouts it accepts."""
    if a.dim() == 2 and b.dim() == 3:  # rows of a split by offs (the MoE forward / dgrad)
        m, k = a.shape
        n = b.shape[2]
        return 2 * m * k * n
    if a.dim() == 2 and b.dim() == 2:  # contraction split by offs (the MoE weight gradient)
        m, k = a.shape
        n = b.shape[1]
        return 2 * m * k * n
    if a.dim() == 3 and b.dim() == 2:  # columns of b split by offs
        _, m, k = a.shape
        n = b.shape[1]
        return 2 * m * k * n
    g, m, k = a.shape  # batched
    return 2 * g * m * k * b.shape[2]


def op_flops(func, args: tuple, kwargs: dict, out) -> int:
    """Dense FLOPs of one aten op (0 for elementwise and data-movement ops)."""
    packet = func.overloadpacket
    formula = flop_registry.get(packet)
    if formula is None and packet.__name__.endswith("_"):  # in-place variant (addmm_, baddbmm_)
        formula = flop_registry.get(getattr(aten, packet.__name__[:-1], None))
    if formula is not None:
        return int(formula(*args, **kwargs, out_val=out))
    if packet in GROUPED_MM_PACKETS:
        return grouped_mm_flops(args[0], args[1])
    if is_sdpa(func):
        q, k, v = (arg(func, args, kwargs, n) for n in ("query", "key", "value"))
        grad_out = arg(func, args, kwargs, "grad_out")
        if grad_out is None:
            return int(sdpa_flop_count(q.shape, k.shape, v.shape))
        return int(sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape))
    return 0


def kernel_recompute_flops(func, args: tuple, kwargs: dict) -> int:
    """FLOPs a fused attention backward spends recomputing the forward scores (q @ k^T).

    torch counts them in SDPA backward (5 bmm); model FLOPs exclude them (backward = 2 x forward,
    as for the unfused path's 4 bmm), so the two paths price alike.
    """
    if not is_sdpa(func) or arg(func, args, kwargs, "grad_out") is None:
        return 0
    q, k = arg(func, args, kwargs, "query"), arg(func, args, kwargs, "key")
    b, h, s_q, d = q.shape
    return 2 * b * h * s_q * d * k.shape[2]


def attention_fraction(seq_q: int, seq_k: int, causal: bool, window: int | None) -> float:
    """Share of the (query, key) pairs an attention mask keeps, the rule model FLOPs use.

    - not causal: 1;
    - causal: exactly 1/2 (the convention behind published MFU numbers: a query sees on average
      half the keys; the exact discrete share (s + 1) / (2 s) differs by 1/(2 s));
    - causal with a sliding window w: each query at position p sees min(p, w) keys; in the same
      continuous form that makes plain causal 1/2, the kept area is s*w - w^2/2 of s^2 pairs
      (w >= s reduces to 1/2).
    `seq_q` is accepted for query shards; the rule uses the key length as s.
    """
    if not causal:
        return 1.0
    s = max(seq_k, 1)
    if window is None or window >= s:
        return 0.5
    w = window
    return (s * w - w * w / 2) / (s * s)


def span_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a (possibly strided or expanded) tensor touches."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)
    return min(span, t.numel()) * t.element_size()


def shape_str(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def numel(shape) -> int:
    return math.prod(shape)
