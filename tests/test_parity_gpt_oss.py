"""GPT-OSS parity: xplan's runtime model against transformers' GptOssForCausalLM (the reference).

Tiny random config, float32: same weights -> same logits and same parameter gradients; xplan's
checkpoint writer round-trips through transformers; parameter counts of the published sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

transformers = pytest.importorskip("transformers")

from xplan.runtime import load_model, save_hf  # noqa: E402
from xplan.runtime.models import CausalLM, load_config  # noqa: E402
from xplan.runtime.models.gpt_oss import ClampedSwiGLUExperts, TopKSoftmaxRouter  # noqa: E402

VOCAB, SEQ, BATCH = 128, 24, 2
NUM_EXPERTS, TOP_K = 8, 3
DEAD_EXPERT = 5  # receives no token in the `empty_expert` case


def tiny_config() -> transformers.GptOssConfig:
    return transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=6,  # < SEQ: the window cuts keys off
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        # Real-model RoPE: YaRN, factor 32 over 4096 positions, no truncation of the ramp.
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "truncate": False, "original_max_position_embeddings": 4096},
        rope_theta=150000,
        max_position_embeddings=131072,
        swiglu_limit=1.5,  # small so the clamps are exercised by random weights
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",
    )


def reference_model(seed: int, empty_expert: bool) -> transformers.GptOssForCausalLM:
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(tiny_config()).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))  # non-zero sinks (they init to zero)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))  # tokens differ enough to spread routing
            elif ".router." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "experts" in name or name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        if empty_expert:
            for layer in model.model.layers:
                layer.mlp.router.bias[DEAD_EXPERT] = -1e4
    return model


def hf_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def xplan_grads_as_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """xplan's gradients under checkpoint names and layouts."""
    grads = {}
    experts = {name + ".": m for name, m in model.named_modules() if isinstance(m, ClampedSwiGLUExperts)}
    for name, p in model.named_parameters():
        prefix, _, local = name.rpartition(".")
        if prefix + "." in experts:
            hf, transposed = ClampedSwiGLUExperts._HF_NAMES[local]
            grads[f"{prefix}.{hf}"] = p.grad.transpose(-2, -1) if transposed else p.grad
        else:
            grads[name] = p.grad
    return grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.mark.parametrize("empty_expert", [False, True], ids=["all_experts", "empty_expert"])
def test_logits_and_grads_match_transformers(tmp_path, empty_expert):
    ref = reference_model(seed=3 if empty_expert else 0, empty_expert=empty_expert)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)

    # The tiny model really uses the GPT-OSS features under test.
    attn = ours.model.layers[0].self_attn
    assert attn.sliding_window == 6 and ours.model.layers[1].self_attn.sliding_window is None
    assert attn.sinks.abs().min() > 0
    assert ours.config.rope["rope_type"] == "yarn"
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert ours.model.rotary_emb.scale == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)

    # Record the expert ids chosen by every xplan MoE layer and the expert pre-activations.
    routed, pre_act = [], []
    hooks = [m.register_forward_hook(lambda m, i, o: routed.append(o[1].detach()))
             for m in ours.modules() if isinstance(m, TopKSoftmaxRouter)]
    for m in ours.modules():
        if isinstance(m, ClampedSwiGLUExperts):
            m.activation = lambda x, f=m.activation: pre_act.append(x.detach()) or f(x)
    logits = ours(ids)
    for h in hooks:
        h.remove()
    ref_logits = ref(input_ids=ids).logits

    assert len(routed) == 4
    gate = torch.cat([x[:, 0::2].flatten() for x in pre_act])
    up = torch.cat([x[:, 1::2].flatten() for x in pre_act])
    limit = ours.config.swiglu_limit
    assert (gate > limit).any() and (up > limit).any() and (up < -limit).any()  # the clamps bite
    counts = torch.stack([torch.bincount(r.flatten(), minlength=NUM_EXPERTS) for r in routed])
    if empty_expert:
        assert (counts[:, DEAD_EXPERT] == 0).all(), counts
    else:
        assert (counts > 0).all(), counts  # every expert of every layer gets tokens

    assert logits.shape == ref_logits.shape == (BATCH, SEQ, VOCAB)
    assert rel_err(logits, ref_logits) <= 1e-5

    loss_of(logits, labels).backward()
    loss_of(ref_logits, labels).backward()
    ours_g, ref_g = xplan_grads_as_hf(ours), hf_grads(ref)
    assert set(ours_g) == set(ref_g)
    for name, g in ref_g.items():
        assert ours_g[name] is not None, name
        assert ours_g[name].shape == g.shape, name
        if g.abs().max() == 0:  # the dead expert's weights get no gradient in either model
            assert empty_expert and "experts" in name and ours_g[name].abs().max() == 0, name
            continue
        assert rel_err(ours_g[name], g) <= 1e-5, (name, rel_err(ours_g[name], g))
    if empty_expert:
        dead = ours_g["model.layers.0.mlp.experts.gate_up_proj"][DEAD_EXPERT]
        assert dead.abs().max() == 0


def test_expert_activation_formula():
    """Clamped SwiGLU with alpha 1.702, written out independently of both implementations."""
    experts = ClampedSwiGLUExperts(2, 8, 4, limit=1.5)
    gate_up = 3.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    assert (gate > 1.5).any() and (up < -1.5).any() and (up > 1.5).any()
    expected = (up.clamp(-1.5, 1.5) + 1) * gate.clamp(max=1.5) * torch.sigmoid(1.702 * gate.clamp(max=1.5))
    torch.testing.assert_close(experts.activation(gate_up), expected)


def test_save_hf_round_trips_through_transformers(tmp_path):
    ref = reference_model(seed=1, empty_expert=False)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    save_hf(ours, tmp_path / "xplan")

    back = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path / "xplan", attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert set(ref_state) == set(back_state)
    for key, value in ref_state.items():
        assert torch.equal(value, back_state[key]), key

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert rel_err(ours(ids), ref(input_ids=ids).logits) <= 1e-5


def parameter_counts(name: str) -> tuple[int, int, int]:
    """(total, active, embedding) parameters of a preset, counted on meta.

    Active = total minus, in every MoE layer, the routed experts a token does not visit
    ((E - k) / E of the expert parameters, biases included). Embedding and unembedding are counted
    in `total` and `active`; the embedding table is returned separately.
    """
    model = load_model(name, device="meta")
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for m in model.modules() if isinstance(m, ClampedSwiGLUExperts)
                 for p in m.parameters())
    inactive = expert * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    return total, total - inactive, model.model.embed_tokens.weight.numel()


@pytest.mark.parametrize(
    "name, total_b, active_b, active_no_embed_b",
    [("gpt-oss-120b", 116.83, 5.71, 5.13), ("gpt-oss-20b", 20.91, 4.19, 3.61)],
)
def test_parameter_counts(name, total_b, active_b, active_no_embed_b):
    total, active, embed = parameter_counts(name)
    assert total / 1e9 == pytest.approx(total_b, abs=0.01)
    assert active / 1e9 == pytest.approx(active_b, abs=0.01)
    # OpenAI's model card counts active parameters without the embedding table (unembedding in).
    assert (active - embed) / 1e9 == pytest.approx(active_no_embed_b, abs=0.01)


def test_parameter_count_equals_transformers():
    cfg = load_model("gpt-oss-20b", device="meta").config
    hf_cfg = transformers.GptOssConfig(**{k: v for k, v in cfg.hf_dict.items() if k != "model_type"})
    with torch.device("meta"):
        ref = transformers.GptOssForCausalLM(hf_cfg)
    total, _, _ = parameter_counts("gpt-oss-20b")
    assert total == sum(p.numel() for p in ref.parameters())


def test_runs_under_fake_tensors(tmp_path):
    """Static shapes throughout (routing, bias gather, grouped GEMM): forward and backward trace under
    FakeTensorMode, as the planner's tracer and dry runs need."""
    tiny_config().save_pretrained(tmp_path)
    config = load_config(tmp_path)
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(torch.bfloat16)  # torch._grouped_mm's meta kernel takes bf16 only
        try:
            model = CausalLM(config)
        finally:
            torch.set_default_dtype(default)
        for m in model.modules():
            if isinstance(m, ClampedSwiGLUExperts):
                m.grouped_gemm = "grouped_mm"
        logits = model(torch.randint(0, VOCAB, (BATCH, SEQ)))
        logits.float().sum().backward()
    assert isinstance(logits, FakeTensor) and logits.shape == (BATCH, SEQ, VOCAB)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_bias.grad.shape == experts.gate_up_bias.shape
