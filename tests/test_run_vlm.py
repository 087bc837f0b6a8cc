"""`xplan run` on a tiny InternVL-style model (InternViT + Qwen3-MoE language model) on CPU:
synthetic image + text batches (random images first, then text), losses go down, and world size 4
(EP 2 x FSDP 4, spawned by `xplan run`) trains exactly like one process (fp32, gloo)."""

from __future__ import annotations

import json

import pytest

from tests.test_run_cli import run_json, write_plan, xplan

TINY_VLM = {
    "model_type": "internvl", "image_token_id": 3, "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "norm_topk_prob": True, "max_position_embeddings": 256, "tie_word_embeddings": False},
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
                      "image_size": 56, "patch_size": 14, "norm_type": "rms_norm", "use_qk_norm": True},
}
IMAGES = {"image_tokens": 8}  # two 56x56 images of 4 tokens each per 32-token sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm_baseline(tmp_path_factory, vlm_dir):
    root = tmp_path_factory.mktemp("vlm-baseline")
    return run_json(write_plan(root / "plan.yaml", vlm_dir, training=IMAGES), "--steps", 20)


def test_vlm_trains_on_image_text_batches(vlm_baseline):
    losses = vlm_baseline["losses"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2  # the loss goes down


def test_world_4_ep2_fsdp_matches_world_1(vlm_baseline, vlm_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, devices=4, fsdp=4, ep=2, micro_batch=1, training=IMAGES)
    summary = run_json(plan, "--steps", 20)
    assert summary["world_size"] == 4
    ref = vlm_baseline["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], ref, strict=True)) <= 1e-5


def test_vision_tower_recompute_and_kept_gathered_train_like_world_1(vlm_baseline, vlm_dir, tmp_path):
    # Checkpointed vision layers redo their forward in the backward, and the tower's FSDP units stay
    # gathered across the two micro-batches of each step (world 2): the same numbers (fp32).
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, devices=2, vision_recompute="full",
                      keep_gathered=("vision",), training=IMAGES)
    summary = run_json(plan, "--steps", 20)
    assert summary["world_size"] == 2
    ref = vlm_baseline["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], ref, strict=True)) <= 1e-5


@pytest.mark.parametrize("training, layout, message", [
    ({"image_tokens": 6}, {}, "multiple of the 4 image tokens"),
    ({"image_tokens": 32}, {}, "must leave text"),
])
def test_bad_image_settings_exit_2(vlm_dir, tmp_path, training, layout, message):
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, training=training, **layout)
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and message in err, err


def test_image_tokens_need_a_vision_model(tmp_path):
    from tests.test_run_cli import TINY_MOE

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_MOE))
    plan = write_plan(tmp_path / "plan.yaml", tmp_path / "m", training=IMAGES)
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and "vision-language model" in err, err
