"""DeepSeek-V3 / Kimi K2 parity against the transformers reference (float32, tiny random configs).

Same weights -> same logits and same parameter gradients; checkpoints round-trip both ways; the
full-size presets count ~671B / ~37.5B active (DeepSeek-V3) and ~1.03T / ~32.9B (Kimi K2).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import xplan.runtime as xr  # noqa: E402
from xplan.runtime.models.deepseek import SigmoidGroupTopKRouter  # noqa: E402

TOL = 1e-5
VOCAB = 128
DEAD_EXPERT = 5  # given a -100 selection bias: must receive no token

TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
    first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
CONFIGS = {
    # q LoRA, yarn RoPE with mscale != mscale_all_dim, 4 groups keep 2, top-3.
    "qlora_yarn": dict(
        TINY, q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 0.8, "mscale_all_dim": 0.9,
                         "beta_fast": 32, "beta_slow": 1},
    ),
    # Plain q_proj, default RoPE, 2 groups keep 1, top-2, no renormalisation.
    "plain_q": dict(
        TINY, q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.5,
        norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}

KIMI_TINY = dict(
    TINY, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], q_lora_rank=24, n_group=1,
    topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.827, norm_topk_prob=True,
    topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=0, rope_theta=50000.0,
    rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 8, "beta_fast": 1.0,
                  "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def randomize(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Weights large enough that routing and attention are far from uniform; one dead expert."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if p.dim() == 1 else 0.08 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))
            b[DEAD_EXPERT] = -100.0


def hf_reference(fields: dict, seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).eval()
    randomize(model, seed)
    return model


def inputs(seed: int, batch: int = 2, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    return ids, torch.randint(0, VOCAB, (batch, seq), generator=gen)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def hf_grads_by_our_names(hf: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """transformers stores experts fused ([E, 2I, H] gate_up_proj); xplan stacks gate and up apart."""
    out = {}
    for name, p in hf.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            gate, up = p.grad.chunk(2, dim=1)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[name] = p.grad
    return out


def record_routing(model) -> tuple[list[torch.Tensor], list]:
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[1].detach().clone()))
               for m in model.modules() if isinstance(m, SigmoidGroupTopKRouter)]
    return seen, handles


def assert_parity(ours, hf: DeepseekV3ForCausalLM, seed: int) -> None:
    """Logits (both grouped-GEMM paths) and every parameter gradient of a cross-entropy loss."""
    ids, labels = inputs(seed)
    ref = hf(ids).logits
    hf_loss = loss_of(ref, labels)
    hf_loss.backward()

    seen, handles = record_routing(ours)
    experts = [m for m in ours.modules() if hasattr(m, "grouped_gemm")]
    assert experts
    for impl in ("loop", "grouped_mm"):
        for m in experts:
            m.grouped_gemm = impl
        with torch.no_grad():
            assert rel_err(ours(ids), ref) <= TOL, impl
    for m in experts:
        m.grouped_gemm = "auto"
    ours.zero_grad(set_to_none=True)
    logits = ours(ids)
    for h in handles:
        h.remove()
    assert rel_err(logits, ref) <= TOL
    loss = loss_of(logits, labels)
    assert abs(loss.item() - hf_loss.item()) <= TOL * abs(hf_loss.item())
    loss.backward()

    # The dead expert really received no token in any MoE layer, while the others were used.
    num_moe = len(ours.config.moe_layers)
    assert len(seen) == 3 * num_moe
    for ids_layer in seen:
        counts = torch.bincount(ids_layer.reshape(-1), minlength=ours.config.num_experts)
        assert counts[DEAD_EXPERT] == 0
        assert (counts > 0).sum() >= 3

    hf_grads = hf_grads_by_our_names(hf)
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(hf_grads)
    for name, p in ours_params.items():
        assert p.grad is not None, name
        assert rel_err(p.grad, hf_grads[name]) <= TOL, name
    for layer in ours.config.moe_layers:
        dead = ours_params[f"model.layers.{layer}.mlp.experts.gate_proj"].grad[DEAD_EXPERT]
        assert dead.abs().max() == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deepseek_v3_matches_transformers_and_round_trips(name: str, tmp_path) -> None:
    seed = sorted(CONFIGS).index(name)
    hf = hf_reference(CONFIGS[name], seed)
    hf.save_pretrained(tmp_path / "hf")
    ours = xr.load_model(tmp_path / "hf", dtype=torch.float32)
    assert ours.config.family == "deepseek_v3"
    has_q_lora = CONFIGS[name]["q_lora_rank"] is not None
    attn = ours.model.layers[0].self_attn
    assert hasattr(attn, "q_a_proj") == has_q_lora and hasattr(attn, "q_proj") == (not has_q_lora)
    assert not ours.config.is_moe_layer(0) and ours.config.is_moe_layer(1)
    assert_parity(ours, hf, seed)

    # xplan -> safetensors -> transformers: identical logits, selection bias included.
    xr.save_hf(ours, tmp_path / "ours")
    ids, _ = inputs(seed + 100)
    with torch.no_grad():
        expected = ours(ids)
        for cls in (DeepseekV3ForCausalLM, AutoModelForCausalLM):
            back = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
            assert type(back) is DeepseekV3ForCausalLM
            bias = back.model.layers[1].mlp.gate.e_score_correction_bias
            assert bias[DEAD_EXPERT] == -100.0
            assert rel_err(back(ids).logits, expected) <= TOL


def test_kimi_k2_flavour_matches_transformers(tmp_path) -> None:
    fields = {k: v for k, v in KIMI_TINY.items() if k not in ("model_type", "architectures")}
    hf = hf_reference(fields, seed=7)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(KIMI_TINY))  # the checkpoint as Kimi ships it
    ours = xr.load_model(tmp_path, dtype=torch.float32)
    assert ours.config.model_type == "kimi_k2" and ours.config.family == "deepseek_v3"
    assert ours.config.n_group == 1 and ours.config.rope["rope_type"] == "yarn"
    assert_parity(ours, hf, seed=7)


def test_router_static_shapes_on_meta() -> None:
    router = SigmoidGroupTopKRouter(16, 8, top_k=3, n_group=4, topk_group=2, norm_topk_prob=True,
                                    routed_scaling_factor=2.0).to("meta")
    weights, ids = router(torch.empty(5, 16, device="meta"))
    assert weights.shape == (5, 3) and ids.shape == (5, 3)
    # The selection bias stays fp32 when the model is cast down.
    router = router.to_empty(device="cpu").to(torch.bfloat16)
    assert router.e_score_correction_bias.dtype == torch.float32 and router.weight.dtype == torch.bfloat16


def count_params(preset: str) -> tuple[int, int]:
    model = xr.load_model(preset, dtype=torch.bfloat16, device="meta")
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    idle_per_layer = (cfg.num_experts - cfg.top_k) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total, total - len(cfg.moe_layers) * idle_per_layer


@pytest.mark.parametrize(("preset", "total_b", "active_b"), [("deepseek-v3", 671.0, 37.5), ("kimi-k2", 1030.0, 32.9)])
def test_preset_parameter_counts(preset: str, total_b: float, active_b: float) -> None:
    total, active = count_params(preset)
    assert abs(total / 1e9 - total_b) <= 0.01 * total_b, total
    assert abs(active / 1e9 - active_b) <= 0.01 * active_b, active
