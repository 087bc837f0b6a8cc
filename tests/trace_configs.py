"""Tiny configs of every family for the tracer tests (tests only)."""

from __future__ import annotations

import importlib.util

TINY = {
    "qwen3": dict(
        model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
}

_FAMILY_MODULES = {"deepseek_v3": ("mla", "deepseek"), "gpt_oss": ("gpt_oss",)}


def family_available(family: str) -> bool:
    """Whether the runtime implements this family yet (its model files exist)."""
    return all(importlib.util.find_spec(f"xplan.runtime.models.{m}") is not None
               for m in _FAMILY_MODULES.get(family, ()))


def tiny_config(family: str, **overrides):
    from xplan.runtime.models.config import model_config_from_dict

    return model_config_from_dict({**TINY[family], **overrides}, name=f"tiny-{family}")
