"""Parity with transformers' InternVL (InternViT + projector + Qwen3 / Qwen3-MoE) on tiny random
configs (float32): logits and every gradient, checkpoint load and save_hf round trip."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import xplan.runtime as xr
from tests.parity_utils import assert_grads_match, ce_loss, hf_grads_in_local_names, max_rel_err
from xplan.errors import InputError
from xplan.runtime.models.config import model_config_from_dict

IMAGE_TOKEN = 7
TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
TEXT_CONFIGS = {
    "qwen3": dict(TEXT, model_type="qwen3", tie_word_embeddings=False),
    "qwen3_moe": dict(TEXT, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, mlp_only_layers=[1]),
}
VISION = {
    # InternViT-300M-like: LayerNorm, biased qkv, no q/k norm.
    "vit300m": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=56,
                    patch_size=14, attention_bias=True),
    # InternViT-6B-like (Intern-S1): RMSNorm, q/k norm, no qkv bias, a final LayerNorm.
    "vit6b": dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=56, image_size=56,
                  patch_size=14, attention_bias=False, norm_type="rms_norm", use_qk_norm=True,
                  use_mean_pooling=False),
}
CASES = {"qwen3-vit300m": ("qwen3", "vit300m", False), "qwen3_moe-vit6b": ("qwen3_moe", "vit6b", False),
         "qwen3-vit6b-tied": ("qwen3", "vit6b", True)}
TOKENS_PER_IMAGE = 4  # (56 / 14)^2 patches, pixel-shuffled 2x2


def raw_config(text: str, vision: str, tied: bool) -> dict:
    return {"model_type": "internvl", "text_config": dict(TEXT_CONFIGS[text]), "vision_config": dict(VISION[vision]),
            "image_token_id": IMAGE_TOKEN, "tie_word_embeddings": tied}


def make_reference(case: str, tmp_path):
    torch.manual_seed(0)
    raw = raw_config(*CASES[case])
    config = transformers.InternVLConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    model = transformers.InternVLForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # random norms, scales and embeddings so no mix-up hides behind defaults
        for name, p in model.named_parameters():
            if "norm" in name or "lambda" in name:
                p.uniform_(0.5, 1.5)
            elif "cls_token" in name or "position_embeddings" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "ref")
    return model, tmp_path / "ref"


def batch(images_per_sample: int, seq_len: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 96, (2, seq_len), generator=gen)
    # sample 0: images at the start; sample 1: after two text tokens.
    n = images_per_sample * TOKENS_PER_IMAGE
    ids[0, :n] = IMAGE_TOKEN
    ids[1, 2:2 + n] = IMAGE_TOKEN
    pixels = torch.randn(2 * images_per_sample, 3, 56, 56, generator=gen)
    return ids, pixels


def hf_grads(ref) -> dict[str, torch.Tensor]:
    from xplan.runtime.models.vision import VisionLanguageLM

    out = {}
    for name, grad in hf_grads_in_local_names(ref).items():
        out[VisionLanguageLM.hf_key_to_local(name)] = grad
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("images", [1, 2])
def test_logits_and_grads_match_transformers(case, images, tmp_path):
    ref, directory = make_reference(case, tmp_path)
    ours = xr.load_model(directory, dtype=torch.float32)
    assert type(ours).__name__ == "VisionLanguageLM"
    ids, pixels = batch(images, 13)
    ref_logits = ref(input_ids=ids, pixel_values=pixels).logits
    our_logits = ours(ids, pixel_values=pixels)
    assert our_logits.shape == (2, 13, 96)
    assert max_rel_err(our_logits, ref_logits) <= 1e-5
    ce_loss(ref_logits, ids).backward()
    ce_loss(our_logits, ids).backward()
    ours_grads = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
    assert any(name.startswith("vision_tower.") for name in ours_grads)
    assert_grads_match(ours_grads, hf_grads(ref))


def test_text_only_batch_matches(tmp_path):
    ref, directory = make_reference("qwen3_moe-vit6b", tmp_path)
    ours = xr.load_model(directory, dtype=torch.float32)
    ids = torch.randint(8, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    assert max_rel_err(ours(ids), ref(input_ids=ids).logits) <= 1e-5


@pytest.mark.parametrize("case", ["qwen3-vit300m", "qwen3_moe-vit6b", "qwen3-vit6b-tied"])
def test_save_hf_round_trip_opens_in_transformers(case, tmp_path):
    ref, directory = make_reference(case, tmp_path)
    ours = xr.load_model(directory, dtype=torch.float32)
    xr.save_hf(ours, tmp_path / "out")
    reloaded = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                                            dtype=torch.float32).eval()
    ids, pixels = batch(1, 11, seed=3)
    assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits,
                       ref(input_ids=ids, pixel_values=pixels).logits)
    again = xr.load_model(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(again(ids, pixel_values=pixels), ours(ids, pixel_values=pixels))


def test_intern_s1_style_checkpoint_names_load(tmp_path):
    """Intern-S1's own checkpoints name tensors `model.language_model.*`, `model.vision_tower.*`."""
    from safetensors.torch import save_file

    ref, directory = make_reference("qwen3_moe-vit6b", tmp_path)
    ours = xr.load_model(directory, dtype=torch.float32)
    out = tmp_path / "s1"
    out.mkdir()
    state = {}
    for key, value in ref.state_dict().items():  # per-expert tensors, as the Hub checkpoints hold them
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            base = key.rsplit(".", 1)[0]
            parts = value.chunk(2, dim=1) if key.endswith("gate_up_proj") else (value,)
            names = ("gate_proj", "up_proj") if len(parts) == 2 else ("down_proj",)
            for name, part in zip(names, parts, strict=True):
                for e in range(part.shape[0]):
                    state[f"{base}.{e}.{name}.weight"] = part[e].contiguous()
        else:
            state[key] = value.contiguous()
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(out / "model.safetensors"))
    raw = json.loads((directory / "config.json").read_text())
    raw["model_type"] = "interns1"
    raw["vision_config"]["model_type"] = "interns1_vision"
    raw["vision_config"]["drop_path_rate"] = 0.1
    (out / "config.json").write_text(json.dumps(raw))
    s1 = xr.load_model(out, dtype=torch.float32)
    ids, pixels = batch(1, 9, seed=4)
    assert s1.config.model_type == "interns1"
    assert torch.equal(s1(ids, pixel_values=pixels), ours(ids, pixel_values=pixels))


def test_image_token_count_mismatch_is_refused(tmp_path):
    _, directory = make_reference("qwen3-vit300m", tmp_path)
    ours = xr.load_model(directory, dtype=torch.float32)
    ids, pixels = batch(1, 9)
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids, pixel_values=torch.cat([pixels, pixels]))


@pytest.mark.parametrize("change, message", [
    (lambda r: r["text_config"].update(model_type="llama"), "text_config with model_type"),
    (lambda r: r["vision_config"].pop("hidden_size"), "vision_config lacks hidden_size"),
    (lambda r: r.update(downsample_ratio=0.3), "downsample_ratio"),
    (lambda r: r["vision_config"].update(image_size=60), "multiple of patch_size"),
    (lambda r: r.update(image_token_id=500), "image_token_id"),
    (lambda r: r.update(vision_feature_layer=-2), "vision_feature_layer"),
    (lambda r: r["vision_config"].update(num_attention_heads=3), "multiple of num_attention_heads"),
])
def test_bad_vlm_configs_are_input_errors(change, message):
    raw = json.loads(json.dumps(raw_config("qwen3", "vit300m", False)))
    change(raw)
    with pytest.raises(InputError, match=message):
        model_config_from_dict(raw)
