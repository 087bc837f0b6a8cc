"""Ascend's fused attention, `torch_npu.npu_fusion_attention`, for `kernels.attention: flash` on NPU.

Untested: there is no NPU (and no torch_npu) where xplan's tests run; the call follows torch_npu's
documented interface. What it takes, conservatively: plain causal attention (sparse_mode 2, the
top-left aligned causal mask given as the documented 2048 x 2048 compressed mask), fp16/bf16,
equal query and value widths, GQA natively (BNSD layout). Sliding windows, sinks, unequal widths
and fp32 go to the blockwise path (the registry's fallback).
"""

from __future__ import annotations

import functools

import torch

from .attention import AttentionCase, blockwise

CAUSAL_SPARSE_MODE = 2  # top-left aligned causal
COMPRESSED_MASK = 2048  # the kernel takes a fixed 2048 x 2048 upper-triangular mask in this mode


@functools.cache
def torch_npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return True


def npu_attention_accepts(case: AttentionCase) -> bool:
    return (case.device_type == "npu" and case.plain and case.dtype in (torch.float16, torch.bfloat16)
            and torch_npu_available())


@functools.cache
def _causal_mask(device: str) -> torch.Tensor:
    return torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool, device=device).triu_(1)


def npu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                  q_offset: int = 0) -> torch.Tensor:
    if (sliding_window is not None or sinks is not None or q_offset or q.shape[2] != k.shape[2]
            or q.shape[-1] != v.shape[-1]):
        return blockwise(q, k, v, scale, sliding_window, sinks, q_offset)
    import torch_npu

    out = torch_npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", atten_mask=_causal_mask(str(q.device)),
                                         scale=scale, keep_prob=1.0, sparse_mode=CAUSAL_SPARSE_MODE)
    return out[0]


__all__ = ["npu_attention", "npu_attention_accepts", "torch_npu_available"]
