"""flex_attention for what SDPA's fused backends do not take: sliding windows, GPT-OSS sinks and
MLA's unequal query/value widths (DeepSeek-V3: 192 / 128).

- The mask (causal, optionally a window, queries at global positions `q_offset`..) is a
  `mask_mod`, so fully hidden key blocks are skipped, not computed and masked.
- A sink is one extra logit per head that joins each row's softmax without a value. With Z the
  row's normaliser over the keys and lse = log Z, adding e^sink only enlarges the normaliser:
  out = out_without_sink * Z / (Z + e^sink) = out_without_sink * sigmoid(lse - sink). flex returns
  lse and differentiates through it (on CUDA), so q, k and the sink all get their gradients.
- GQA runs natively (`enable_gqa`): kv heads are not repeated.

On CUDA the function is compiled once (`torch.compile(flex_attention)`; uncompiled flex
materialises the scores) and called outside any surrounding compiled block. torch 2.13 runs flex's
forward on CPU uncompiled (tests compare it with the blockwise path there) but has no backward on
CPU, so the registry lists it for CUDA only.
"""

from __future__ import annotations

import functools

import torch


def flex_available(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def causal_mask_mod(window: int | None, q_offset: int):
    def keep(batch, head, q_idx, kv_idx):
        position = q_idx + q_offset
        visible = kv_idx <= position
        if window is not None:
            visible = visible & (position - kv_idx < window)
        return visible

    return keep


@functools.lru_cache(maxsize=32)
def block_mask(seq_q: int, seq_k: int, window: int | None, q_offset: int, device: str):
    """The BlockMask of one (shape, window, offset); shared by every layer and step alike."""
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled on CUDA so the [seq_q, seq_k] mask is never materialised.
    return create_block_mask(causal_mask_mod(window, q_offset), None, None, seq_q, seq_k, device=device,
                             _compile=torch.device(device).type == "cuda")


@functools.cache
def _flex(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _lse_request() -> dict:
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older flag
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


@torch.compiler.disable  # its own compiled kernel: a decoder block compiled around it calls it as is
def flex_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                        q_offset: int = 0) -> torch.Tensor:
    """Causal attention, q [b, hq, sq, d], k [b, hkv, sk, d], v [b, hkv, sk, dv] -> [b, hq, sq, dv]."""
    mask = block_mask(q.shape[2], k.shape[2], sliding_window, q_offset, str(q.device))
    flex = _flex(q.device.type)
    gqa = q.shape[1] != k.shape[1]
    if sinks is None:
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    out, aux = flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, **_lse_request())
    lse = aux if isinstance(aux, torch.Tensor) else aux.lse
    keep = torch.sigmoid(lse.float() - sinks.float().reshape(1, -1, 1))
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


__all__ = ["block_mask", "causal_mask_mod", "flex_attention_core", "flex_available"]
