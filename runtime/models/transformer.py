"""Decoder-only causal LM shared by every family; families differ only in attention and MLP blocks.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`, ...), so
weights map one-to-one except where a module converts its own keys (stacked experts).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import GQAAttention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU, build_rotary
from .moe import MoE, SoftmaxTopKRouter, SwiGLUExperts
from .tiling import TokenTiling, run_in_tiles


def build_attention(config: ModelConfig, layer: int) -> nn.Module:
    if config.attention_kind == "mla":
        from .mla import MLAttention

        return MLAttention(config, layer)
    return GQAAttention(config, layer)


def build_mlp(config: ModelConfig, layer: int) -> nn.Module:
    if not config.is_moe_layer(layer):
        return SwiGLU(config.hidden_size, config.intermediate_size)
    if config.family == "qwen3_moe":
        router = SoftmaxTopKRouter(config.hidden_size, config.num_experts, config.top_k, config.norm_topk_prob)
        experts = SwiGLUExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        return MoE(router, experts, config.num_experts, config.top_k)
    if config.family == "deepseek_v3":
        from .deepseek import build_deepseek_moe

        return build_deepseek_moe(config)
    if config.family == "gpt_oss":
        from .gpt_oss import build_gpt_oss_moe

        return build_gpt_oss_moe(config)
    raise ValueError(f"family {config.family!r} has no MoE block")


class DecoderLayer(nn.Module):
    # Token tiling of the feed-forward half (runtime/models/tiling.py); None: untiled.
    token_tiling: TokenTiling | None = None

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer_index = layer
        self.kind = self.block_kind(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_mlp(config, layer)

    @staticmethod
    def block_kind(config: ModelConfig, layer: int) -> str:
        """Blocks of one kind are structurally identical (traced once, priced alike)."""
        mlp = "moe" if config.is_moe_layer(layer) else "dense"
        attn = "sliding" if config.layer_attention_type(layer) == "sliding_attention" else "full"
        return f"{attn}_{mlp}" if config.layer_types else mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.feed_forward(x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The token-wise half of the block (post-attention norm, MLP or MoE), in token tiles when
        `token_tiling` asks for them (the residual add stays outside: the block returns a fresh tensor)."""
        tiles = self.token_tiling.count(x.numel() // x.shape[-1]) if self.token_tiling is not None else 1
        if tiles > 1:
            return run_in_tiles(self.norm_mlp, x, tiles)
        return self.norm_mlp(x)

    def norm_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = build_rotary(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class CausalLM(nn.Module):
    """`forward(input_ids)` -> logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, positions))

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random initialisation for training from scratch (normal linears, unit norms, zero biases)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape)
            elif param.dim() == 1 or "bias" in name.rsplit(".", 1)[-1]:  # biases, sinks (incl. stacked expert biases)
                value = torch.zeros(param.shape)
            else:
                value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            param.copy_(value.to(param.dtype))
        for name, buf in self.named_buffers():
            if not name.endswith("inv_freq"):  # persistent state such as routing biases starts at zero
                buf.zero_()

    def materialize(self, device: torch.device | str) -> None:
        """Allocate a meta-built model on `device` (values uninitialised) and rebuild its buffers."""
        self.to_empty(device=device)
        if self.config.tie_word_embeddings:  # to_empty allocates each module's tensors separately
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.rotary_emb = build_rotary(self.config).to(device)


def model_class(config: ModelConfig) -> type[CausalLM]:
    """The module class for a config: `CausalLM`, or `VisionLanguageLM` for InternVL / Intern-S1."""
    if config.is_vlm:
        from .vision import VisionLanguageLM

        return VisionLanguageLM
    return CausalLM
