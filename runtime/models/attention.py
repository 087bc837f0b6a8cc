"""Grouped-query attention (Llama 3, Qwen3, GPT-OSS).

The projections and the attention product are separate steps (`project_qkv`, `core`, `o_proj`)
so sequence parallelism can wrap the product with its all-to-alls without touching the math.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, apply_rope, attention_core


class GQAAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        if config.family == "gpt_oss":
            self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        sliding = config.layer_attention_type(layer) == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.scale = d**-0.5
        # `attention_kernel(q, k, v, scale, window, sinks, q_offset)` set by the kernel registry
        # (runtime/kernels) for the plan's kernels.attention; None runs `attention_core`.
        self.attention_kernel = None

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [b, s, hidden] -> q [b, hq, s, d], k/v [b, hkv, s, d] with RoPE applied."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        sinks = getattr(self, "sinks", None)
        kernel = self.attention_kernel or attention_core
        return kernel(q, k, v, self.scale, self.sliding_window, sinks, q_offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        out = self.core(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
