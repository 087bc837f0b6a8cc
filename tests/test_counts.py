"""Parameter counts: published sizes for presets, and equality with transformers for any config."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from xplan.cli import main
from xplan.runtime import build_model, load_config
from xplan.runtime.models import preset_names
from xplan.runtime.models.config import hf_config_from_dict
from xplan.runtime.models.counting import count_parameters

# Published sizes (total, active) in billions; None where no active figure is published.
PUBLISHED = {
    "deepseek-v3": (671.0, 37.5),
    "kimi-k2": (1030.0, 32.9),
    "qwen3-235b-a22b": (235.1, 22.2),
    "qwen3-30b-a3b": (30.5, 3.35),
    "gpt-oss-120b": (116.8, 5.7),
    "gpt-oss-20b": (20.9, 4.2),
    "llama3-405b": (405.9, None),
    # InternVL 3.5 model card (total, active); Intern-S1: a 235B-A22B language model + a 6B InternViT.
    "internvl3.5-2b": (2.3, None),
    "internvl3.5-8b": (8.5, None),
    "internvl3.5-30b-a3b": (30.8, None),
    "internvl3.5-241b-a28b": (240.7, 28.0),
    "intern-s1": (240.7, 28.0),
}
# Exact stored parameter counts of published checkpoints: (total, vision tower, projector).
PUBLISHED_EXACT = {"internvl3.5-1b": (1_060_897_792, 304_012_288, 5_253_120)}  # InternVL3_5-1B-HF


def inspect_json(capsys, *args) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_inspect_matches_published_sizes(name, capsys):
    total, active = PUBLISHED[name]
    out = inspect_json(capsys, name)
    assert out["params_total"] / 1e9 == pytest.approx(total, rel=0.01, abs=0.05)  # cards round to 0.1B
    if active is not None:
        assert out["params_active"] / 1e9 == pytest.approx(active, rel=0.01, abs=0.05)
    assert out["num_layers"] == load_config(name).num_layers


def transformers_model(raw: dict):
    hf_config = hf_config_from_dict(raw)
    with torch.device("meta"):
        if isinstance(hf_config, transformers.InternVLConfig):
            return transformers.InternVLForConditionalGeneration(hf_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def transformers_count(raw: dict) -> int:
    return sum(p.numel() for p in transformers_model(raw).parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_EXACT))
def test_inspect_matches_published_exact_counts(name, capsys):
    total, vision, projector = PUBLISHED_EXACT[name]
    out = inspect_json(capsys, name)
    assert (out["params_total"], out["params_vision"]) == (total, vision + projector)


VLM_PRESETS = [n for n in preset_names() if n.startswith(("internvl", "intern-s1"))]


@pytest.mark.parametrize("name", VLM_PRESETS)
def test_vlm_presets_split_like_transformers(name, capsys):
    """Vision tower + projector and the language model's active count, against transformers' modules."""
    config = load_config(name)
    model = transformers_model(json.loads(json.dumps(config.hf_dict | {"model_type": config.model_type})))
    vision = sum(p.numel() for n, p in model.named_parameters() if ".vision_tower." in n or "projector" in n)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    inactive = routed * (config.num_experts - config.top_k) // config.num_experts if config.num_experts else 0
    total = sum(p.numel() for p in model.parameters())
    out = inspect_json(capsys, name)
    assert out["params_vision"] == vision > 0
    assert out["params_total"] == total
    assert out["params_language_active"] == total - vision - inactive
    assert out["vision"]["image_tokens_per_image"] == 256


@pytest.mark.parametrize("name", preset_names())
def test_preset_counts_equal_transformers(name):
    config = load_config(name)
    ours = count_parameters(build_model(config, device="meta")).total
    assert ours == transformers_count(json.loads(json.dumps(config.hf_dict | {"model_type": config.model_type})))


CUSTOM = [
    {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
     "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True},
    {"model_type": "qwen3", "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 5,
     "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 96, "vocab_size": 3000},
    {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
     "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
     "num_experts": 16, "num_experts_per_tok": 4, "decoder_sparse_step": 2, "mlp_only_layers": [5],
     "vocab_size": 777},
    {"model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
     "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "n_routed_experts": 16,
     "n_shared_experts": 2, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 2,
     "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
     "v_head_dim": 24, "vocab_size": 500},
    {"model_type": "kimi_k2", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 12,
     "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
     "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
     "v_head_dim": 32, "vocab_size": 640},
    {"model_type": "gpt_oss", "hidden_size": 192, "intermediate_size": 160, "num_hidden_layers": 4,
     "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 8,
     "num_experts_per_tok": 2, "vocab_size": 900, "sliding_window": 64,
     "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
]


@pytest.mark.parametrize("raw", CUSTOM, ids=[c["model_type"] for c in CUSTOM])
def test_any_config_dir_inspects_like_transformers(raw, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    out = inspect_json(capsys, str(tmp_path))
    assert out["params_total"] == transformers_count(raw)
    assert out["num_layers"] == raw["num_hidden_layers"]
