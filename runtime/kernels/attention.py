"""The attention slot: which implementation one attention module gets, and the implementations
that live here (eager, explicit SDPA backends). flex_attention is in `flex.py`, Ascend's fused
kernel in `npu.py`, the blockwise path in `runtime/models/blockwise_attention.py`.

Every implementation has the signature of `runtime/models/layers.py: attention_core`:
``(q [b, hq, s, d], k/v [b, hkv, s, d | dv], scale, sliding_window, sinks, q_offset) -> [b, hq, s, dv]``,
causal, with GQA broadcast inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.blockwise_attention import blockwise_attention
from ..models.layers import attention_core

AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionCase:
    """What decides one module's implementation, known when the kernels are applied."""

    device_type: str
    dtype: torch.dtype  # the compute dtype (bf16 under mixed precision)
    heads: int
    qk_width: int
    v_width: int
    window: int | None
    sinks: bool
    kv_heads: int | None = None  # None: as many as query heads

    @property
    def plain(self) -> bool:
        """Causal attention SDPA's fused backends take as it is."""
        return self.window is None and not self.sinks and self.qk_width == self.v_width


def match_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v with their heads repeated up to q's (GQA)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    return k, v


def hidden_keys(seq_q: int, seq_k: int, window: int | None, q_offset: int, device) -> torch.Tensor:
    """[seq_q, seq_k] bool, True where the causal (and sliding-window) mask hides the key."""
    q_pos = torch.arange(seq_q, device=device)[:, None] + q_offset
    k_pos = torch.arange(seq_k, device=device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= q_pos - k_pos >= window
    return hidden


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                    q_offset: int = 0) -> torch.Tensor:
    """Unfused reference: scores = q k^T, masked softmax in fp32 (a sink is one more logit per row
    that takes probability but carries no value), probabilities @ v. Keeps the [b, h, sq, sk]
    probabilities for backward: the memory cost the `eager` choice stands for."""
    k, v = match_heads(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    hidden = hidden_keys(q.shape[2], k.shape[2], sliding_window, q_offset, q.device)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def blockwise(q, k, v, scale, sliding_window=None, sinks=None, q_offset=0) -> torch.Tensor:
    k, v = match_heads(q, k, v)
    return blockwise_attention(q, k, v, scale, sliding_window, sinks, q_offset)


# ---------------------------------------------------------------------------------- SDPA backends
def _backends() -> dict[str, SDPBackend]:
    return {"sdpa(flash backend)": SDPBackend.FLASH_ATTENTION,
            "sdpa(cudnn backend)": SDPBackend.CUDNN_ATTENTION,
            "sdpa(memory-efficient backend)": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_backend_accepts(name: str, case: AttentionCase, native_gqa: bool | None = None) -> bool:
    """torch's own check (`torch.backends.cuda.can_use_*`) on small probe tensors of the case's
    dtype, widths and heads on the current CUDA device; False without one. `native_gqa`: kv heads
    as they are (True), repeated up to the query heads (False), either (None)."""
    if case.device_type != "cuda" or not torch.cuda.is_available():
        return False
    if native_gqa is None:
        return sdpa_backend_accepts(name, case, True) or sdpa_backend_accepts(name, case, False)
    import torch.backends.cuda as cuda_backends

    check = {"sdpa(flash backend)": cuda_backends.can_use_flash_attention,
             "sdpa(cudnn backend)": cuda_backends.can_use_cudnn_attention,
             "sdpa(memory-efficient backend)": cuda_backends.can_use_efficient_attention}[name]
    kv_heads = (case.kv_heads or case.heads) if native_gqa else case.heads

    def probe(heads: int, width: int) -> torch.Tensor:
        return torch.empty(1, heads, 128, width, dtype=case.dtype, device="cuda")

    params = cuda_backends.SDPAParams(probe(case.heads, case.qk_width), probe(kv_heads, case.qk_width),
                                      probe(kv_heads, case.v_width), None, 0.0, True, kv_heads != case.heads)
    return bool(check(params, False))


def sdpa_with_backend(name: str, native_gqa: bool = False) -> AttentionFn:
    """SDPA restricted to one backend (torch raises rather than silently switching); with
    `native_gqa` kv heads are not repeated (`enable_gqa`: k and v are saved for backward at their
    own size). Cases SDPA cannot take (queries at an offset, unequal lengths) go to the blockwise
    path."""
    backend = _backends()[name]

    def run(q, k, v, scale, sliding_window=None, sinks=None, q_offset=0):
        if sliding_window is not None or sinks is not None or q_offset or q.shape[2] != k.shape[2]:
            return blockwise(q, k, v, scale, sliding_window, sinks, q_offset)
        if not native_gqa:
            k, v = match_heads(q, k, v)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])

    run.__name__ = f"sdpa_{backend.name.lower()}"
    return run


# ---------------------------------------------------------------------------------- selection
def attention_accepts(name: str, case: AttentionCase,
                      backend_check: Callable[[str, AttentionCase], bool] = sdpa_backend_accepts) -> bool:
    """Whether implementation `name` takes this module (the registry's `needs`, as code)."""
    if name == "sdpa":
        return case.window is None and not case.sinks and (case.qk_width == case.v_width or
                                                          case.device_type == "cuda")
    if name in _backends():
        return case.plain and backend_check(name, case)
    if name == "flex_attention":
        from .flex import flex_available

        return not case.plain and flex_available(case.device_type)
    if name == "npu_fusion_attention":
        from .npu import npu_attention_accepts

        return npu_attention_accepts(case)
    return name in ("eager", "blockwise")


def attention_function(name: str, case: AttentionCase | None = None,
                       backend_check: Callable[..., bool] = sdpa_backend_accepts) -> AttentionFn:
    """The callable a module of `case` runs for implementation `name`."""
    if name == "sdpa":
        return attention_core  # the models' default dispatch (SDPA, blockwise where SDPA cannot)
    if name == "eager":
        return eager_attention
    if name == "blockwise":
        return blockwise
    if name in _backends():
        gqa = case is not None and (case.kv_heads or case.heads) != case.heads
        return sdpa_with_backend(name, native_gqa=gqa and backend_check(name, case, True))
    if name == "flex_attention":
        from .flex import flex_attention_core

        return flex_attention_core
    if name == "npu_fusion_attention":
        from .npu import npu_attention

        return npu_attention
    raise ValueError(f"unknown attention implementation {name!r}")


def attention_case(module, device_type: str, dtype: torch.dtype) -> AttentionCase:
    """The case of a GQAAttention or MLAttention module."""
    if hasattr(module, "qk_head_dim"):  # MLA: keys [nope, rope], values narrower
        qk, v = module.qk_head_dim, module.v_head_dim
    else:
        qk = v = module.head_dim
    return AttentionCase(device_type, dtype, module.num_heads, qk, v, getattr(module, "sliding_window", None),
                         "sinks" in module._parameters, getattr(module, "num_kv_heads", module.num_heads))


__all__ = ["AttentionCase", "attention_accepts", "attention_case", "attention_function", "blockwise",
           "eager_attention", "hidden_keys", "match_heads", "sdpa_backend_accepts", "sdpa_with_backend"]
