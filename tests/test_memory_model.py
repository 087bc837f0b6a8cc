"""The memory model's layer walk: recompute policies per layer and the backward moment."""

from types import SimpleNamespace

import pytest

from xplan.cost_models.memory import (
    backward_moment,
    fsdp_backward_buffers,
    head_phase_bytes,
    layers_by_policy,
    redone_mm_bytes,
    stage_layers,
)
from xplan.layout import Layout, recompute_policies


def _trace(kinds, blocks, embedding=0, embedding_params=0):
    emb = SimpleNamespace(kind="embedding", saved_bytes={"none": embedding}, params_total=embedding_params)
    params = embedding_params + sum(blocks[k].params_total for k in kinds) if blocks else embedding_params
    return SimpleNamespace(layer_kinds=tuple(kinds), blocks=blocks, others={"embedding": emb}, params_total=params)


def _block(saved, peak, params=None):
    """A block whose backward peak is all in its MLP part (attention part 0)."""
    return SimpleNamespace(saved_bytes=saved, backward_peak={p: {"mlp": v, "attention": 0} for p, v in peak.items()},
                           num_experts=0, params=params or {"dense": 0}, params_total=sum((params or {}).values()))


def test_recompute_fraction_takes_the_first_layers_as_the_runtime_does():
    assert Layout(devices=8, fsdp=8, recompute=0.5).recompute_policies(61) == ["full"] * 31 + ["none"] * 30
    assert recompute_policies("selective", 3) == ["selective"] * 3
    trace = _trace(["dense"] * 3 + ["moe"] * 58, {})
    layers = stage_layers(trace, 0.5, pp=1)
    assert layers[:4] == [("dense", "full")] * 3 + [("moe", "full")]
    assert layers_by_policy(trace, 0.5, pp=1) == {"full": 31, "none": 30}
    assert len(stage_layers(trace, "none", pp=4)) == 16  # ceil(61 / 4) layers on the first stage


def test_backward_moment_walks_layers_from_the_last():
    blocks = {"a": _block({"none": 10, "full": 1}, {"none": 5, "full": 30}),
              "b": _block({"none": 20, "full": 2}, {"none": 4, "full": 12})}
    trace = _trace(["a", "b", "a", "b"], blocks, embedding=3)
    # Full recompute: cumulative saved 3+1, +2, +1, +2 = 4, 6, 7, 9; workspaces 30, 12, 30, 12.
    # Layer 2 ('a', 7 + 30 = 37) beats the last layer (9 + 12 = 21). Blocks without parameters.
    assert backward_moment(trace, "full", 1.0, 1, 1, 1, 1.0, 1.0) == (7, 30, 0, 0, 0)
    # Halved tokens halve both; a second micro-batch in flight keeps the whole stage's saved bytes.
    assert backward_moment(trace, "full", 0.5, 1, 1, 1, 1.0, 1.0) == pytest.approx((3.5, 15, 0, 0, 0))
    assert backward_moment(trace, "full", 1.0, 1, 1, 1, 1.0, 2.0) == (7 + 9, 30, 0, 0, 0)
    # Half recomputed: layers 0-1 full, 2-3 none: cumulative 4, 6, 16, 36; workspaces 30, 12, 5, 4.
    assert backward_moment(trace, 0.5, 1.0, 1, 1, 1, 1.0, 1.0) == (36, 4, 0, 0, 0)


def test_fsdp_buffers_follow_the_units_of_a_block():
    block = SimpleNamespace(params={"attention": 60, "routed_expert": 400}, params_total=460)
    # One unit (EP 1): this block and the previous one gathered (2 x 460 x 2 B), its bf16 gradients
    # and the previous reduce-scatter's fp32 input (460 x (2 + 4)).
    assert fsdp_backward_buffers(block, 1, 1, 2, False)["mlp"] == (1840, 2760)
    # EP 4: experts (100 per rank) are their own unit. MLP: two dense units + own experts
    # gathered, expert bf16 grads + the later block's dense fp32 reduce-scatter input.
    buffers = fsdp_backward_buffers(block, 4, 1, 2, False)
    assert buffers["mlp"] == ((2 * 60 + 100) * 2, 100 * 2 + 60 * 4)
    # Attention: experts resharded, their fp32 reduce-scatter input held.
    assert buffers["attention"] == (2 * 60 * 2, 60 * 2 + 100 * 4)
    assert fsdp_backward_buffers(block, 4, 1, 2, True)["attention"] == (0.0, 160 * 6)


def test_first_micro_batch_gradients_appear_as_the_backward_reaches_each_layer():
    blocks = {"a": _block({"none": 10}, {"none": 5}, params={"dense": 25})}
    trace = _trace(["a"] * 4, blocks, embedding=0, embedding_params=0)
    # 100 B of gradients when complete; every layer also holds 2 x 25 x 2 B gathered and 25 x 6 B of
    # gradient buffers. Accumulated: all resident at every layer (the last layer wins: 40 saved).
    # Only micro-batch: layer 3 has none yet, layer 0 has the 75 B of layers 1-3.
    assert backward_moment(trace, "none", 1.0, 1, 1, 1, 1.0, 1.0, grads=100.0) == (40, 5, 100, 150, 100.0)
    moment = backward_moment(trace, "none", 1.0, 1, 1, 1, 1.0, 1.0, grads=100.0, accumulated=False)
    assert moment == (10, 5, 100, 150, 75.0)  # layer 0: 10 + 75 beats layer 3: 40 + 0


def test_head_phase_takes_the_larger_of_the_loss_backward_and_the_weight_gradient():
    head = SimpleNamespace(saved_bytes={"none": 100}, params_total=10, backward_peak={"none": {"mlp": 1000}})
    trace = SimpleNamespace(others={"head": head})
    # Gathered weight (10 x 2 B) + the loss's logit gradients (1000 B, scaled by this rank's tokens).
    assert head_phase_bytes(trace, 1.0, 1, 2) == (100, 20 + 1000)
    assert head_phase_bytes(trace, 0.5, 1, 2) == (50, 20 + 500)
    # A small loss peak leaves the weight gradient (bf16 + its fp32 reduce copy) as the larger.
    head.backward_peak = {"none": {"mlp": 1}}
    assert head_phase_bytes(trace, 1.0, 1, 2) == (100, 20 + 10 * 6)


def test_full_loss_backward_holds_two_fp32_logit_gradients():
    """nll_loss's gradient and log_softmax's gradient, both [tokens, vocab] fp32, beside the saved
    log-softmax: what the head's traced backward peak must show (the runtime's own full loss)."""
    from tests.trace_configs import tiny_config
    from xplan.planner.trace import trace_model

    config = tiny_config("qwen3_moe")
    seq = 32
    trace = trace_model(config, seq, loss="full", use_cache=False)
    fp32_logits = seq * config.vocab_size * 4
    assert max(trace.others["head"].backward_peak["none"].values()) == pytest.approx(2 * fp32_logits, rel=0.05)


def test_torchtitan_selective_policy_keeps_fewer_mm_outputs():
    """Redoing every second mm (op-level SAC) drops those mms' outputs from what selective keeps."""
    from tests.trace_configs import tiny_config
    from xplan.planner.trace import trace_model

    trace = trace_model(tiny_config("qwen3"), 32, use_cache=False)
    kind = next(iter(trace.blocks))
    mms = [d for _, d in trace.graph.nodes(data=True)
           if d.get("type") == "op" and d.get("stage") == kind and d.get("phase") == "forward"
           and str(d.get("op", "")).rstrip("_") == "mm"]
    assert len(mms) >= 4
    assert redone_mm_bytes(trace, kind, 2) == sum(int(d["bytes_written"]) for d in mms[1::2])
    assert redone_mm_bytes(trace, kind, 0) == 0
    from xplan.cost_models.memory import activation_bytes

    kept_all, _ = activation_bytes(trace, "selective", 1.0, 1, 1, 1, 1.0, 1.0)
    kept_half, _ = activation_bytes(trace, "selective", 1.0, 1, 1, 1, 1.0, 1.0, every_mm=2)
    assert kept_all - kept_half == pytest.approx(trace.blocks[kind].count * redone_mm_bytes(trace, kind, 2))


def test_ulysses_adds_an_attention_output_copy_only_where_the_traced_kernel_shares_it():
    """Without recompute, Ulysses' reverse all-to-all makes the output projection's input a tensor
    of its own; at sp = 1 it shares the SDPA kernel's saved output, but the CPU-traced blockwise
    attention of MLA (values narrower than keys) already has the copy (memory matrix row 16,
    deepseek-v3 sp 4: +3.0% -> -0.3% against the dry run)."""
    from xplan.cost_models.memory import parallel_saved_bytes, traced_output_shared
    from xplan.planner.pricing import load_model_config

    layout = Layout(devices=8, sp=4)
    for model, shared in (("qwen3-8b", True), ("deepseek-v3", False), ("gpt-oss-20b", False)):
        config = load_model_config(model)
        assert traced_output_shared(config) is shared
        extra = parallel_saved_bytes(config, layout, {"none": 1.0}, 0.0, 1024.0, 2)
        assert extra == (1024 * config.num_heads * config.v_dim * 2 if shared else 0.0), model
