"""Issue #18's mechanisms, each a small pure function checked by hand: pipeline memory per
schedule, EP all-to-all overlap, DualPipe's bubble, fused-kernel activation saving, grouped-GEMM
tiles and fp8 casts, fused attention over the runtime's blockwise path, fits on the allocated peak."""

from __future__ import annotations

from types import SimpleNamespace

import networkx as nx
import pytest

from xplan.cost_models import ep_overlap, pipeline
from xplan.cost_models.compute import GROUP_TILE_ROWS, RankWork, fp8_cast_time, grouped_rows
from xplan.cost_models.estimate import fits_memory
from xplan.cost_models.memory import MemoryBreakdown, fused_saved_bytes, saving_rule
from xplan.hw_profiles import load_profile
from xplan.layout import check_layout, layout_from_dict


# ------------------------------------------------------------------ pipeline memory per schedule
def test_1f1b_first_stage_holds_pp_micro_batches_last_holds_one():
    # Megatron's non-interleaved 1F1B: stage r warms up pp - r - 1 forwards.
    assert pipeline.in_flight("1f1b", 16, 1, 0, 64) == 16
    assert pipeline.in_flight("1f1b", 16, 1, 15, 64) == 1
    assert pipeline.in_flight("1f1b", 8, 1, 3, 64) == 5
    assert pipeline.in_flight("1f1b", 8, 1, 0, 4) == 4  # capped by the step's micro-batches
    assert pipeline.in_flight("1f1b", 1, 1, 0, 64) == 1


def test_interleaved_counts_warmup_chunks():
    # (pp - r - 1) * 2 + (vpp - 1) * pp warm-up chunks + the one running, each 1/vpp of the rank.
    assert pipeline.in_flight("interleaved", 8, 5, 0, 64) == pytest.approx((7 * 2 + 4 * 8 + 1) / 5)  # 9.4
    assert pipeline.in_flight("interleaved", 8, 5, 7, 64) == pytest.approx((4 * 8 + 1) / 5)  # 6.6
    assert pipeline.in_flight("interleaved", 4, 8, 0, 16) == pytest.approx(4 + 3 / 8)


def test_dualpipe_memory_and_bubble():
    assert pipeline.in_flight("dualpipe", 16, 1, 0, 120) == 17  # PP + 1 (DeepSeek-V3 Table 2)
    assert pipeline.parameter_copies("dualpipe") == 2 and pipeline.parameter_copies("1f1b") == 1
    # (PP/2 - 1)(F&B + B - 3W): pp 16, pair 10, backward 6, weight gradients 2 -> 7 x 10 = 70.
    assert pipeline.dualpipe_bubble(16, 10.0, 6.0, 2.0) == pytest.approx(70.0)
    assert pipeline.bubble_slots("1f1b", 16, 1) == 15 and pipeline.bubble_slots("interleaved", 8, 5) == 7 / 5


def test_schedule_and_stage_layers_follow_megatron():
    layout = layout_from_dict({"devices": 64, "tp": 4, "pp": 8, "vpp": 5})
    assert pipeline.schedule(layout) == "interleaved"
    assert pipeline.schedule(layout.with_changes(vpp=1)) == "1f1b"
    assert pipeline.schedule(layout.with_changes(vpp=1, ep_overlap="dualpipe")) == "dualpipe"
    assert pipeline.stage_layer_count(80, 8, 5, "first") == 10
    assert pipeline.stage_layer_count(94, 32, 3, "first") == 2  # embedding takes a layer's slot
    assert pipeline.stage_layer_count(61, 16, 1, "last") == 4  # 61 / 16 spread evenly, rounded up


def test_dualpipe_needs_an_even_pipeline():
    config = SimpleNamespace(num_layers=8, num_experts=4, num_heads=8, num_kv_heads=8, attention_kind="gqa",
                             name="m")
    check_layout(layout_from_dict({"devices": 8, "pp": 2, "ep_overlap": "dualpipe"}), config, 64)
    with pytest.raises(Exception, match="even pp"):
        check_layout(layout_from_dict({"devices": 6, "pp": 3, "ep_overlap": "dualpipe"}), config, 64)


# ------------------------------------------------------------------ EP all-to-all overlap
def test_exposed_keeps_every_all_to_all():
    assert ep_overlap.overlap_micro("exposed", 10.0, 4.0, 1.0) == (4.0, 1.0)


def test_overlapped_compute_gives_communication_its_sms():
    share = ep_overlap.DUALPIPE_COMM_SM_SHARE  # 20 of 132 SMs (DeepSeek-V3 report)
    # 4 s of communication beside 10 s of compute: those 4 s of compute run on 112 / 132 of the SMs.
    assert ep_overlap.overlapped(10.0, 4.0) == pytest.approx(10.0 + 4.0 * share / (1 - share))
    assert ep_overlap.overlapped(2.0, 4.0) == pytest.approx(4.0)  # communication-bound
    assert ep_overlap.overlapped(10.0, 0.0) == 10.0


def test_microbatch_overlap_hides_under_the_partner_compute():
    # 15 of 16 micro-batches paired (one runs alone at pp 1).
    paired = ep_overlap.paired_share("microbatch", 16, 0.0)
    assert paired == pytest.approx(15 / 16)
    a2a, p2p = ep_overlap.overlap_micro("microbatch", 10.0, 4.0, 1.0, paired)
    assert p2p == 1.0
    assert a2a == pytest.approx(4.0 / 16 + 15 / 16 * (ep_overlap.overlapped(10.0, 4.0) - 10.0))
    # Communication longer than the partner's compute: the excess stays exposed.
    a2a, _ = ep_overlap.overlap_micro("microbatch", 3.0, 4.0, 0.0, 1.0)
    assert a2a == pytest.approx(1.0)
    # pp 4: the warm-up forwards (3) run alone.
    assert ep_overlap.paired_share("microbatch", 16, 3.0) == pytest.approx(13 / 16)
    assert ep_overlap.paired_share("exposed", 16, 3.0) == 0.0


def test_dualpipe_hides_all_to_all_and_p2p_at_the_cost_of_communication_sms():
    a2a, p2p = ep_overlap.overlap_micro("dualpipe", 10.0, 4.0, 1.0)
    assert p2p == 0.0 and a2a == pytest.approx(ep_overlap.overlapped(10.0, 5.0) - 10.0)
    a2a, _ = ep_overlap.overlap_micro("dualpipe", 2.0, 4.0, 1.0)  # communication-bound pair
    assert a2a == pytest.approx(5.0 - 2.0)
    assert ep_overlap.overlap_micro("dualpipe", 10.0, 0.0, 0.0) == (0.0, 0.0)


# ------------------------------------------------------------------ fused-kernel activation saving
def _graph(ops):
    """ops: (name, kind, saved, written, read, inputs): kind 'k' a kernel (FLOPs), 'm' memory-bound."""
    g = nx.DiGraph()
    for i, (name, kind, saved, written, read, inputs) in enumerate(ops):
        g.add_node(f"op{i}", type="op", op=name, stage="dense", phase="forward", saved_bytes=saved,
                   bytes_written=written, bytes_read=read, flops=100 if kind == "k" else 0,
                   module="input_layernorm" if i < 3 else "mlp")
        for j in inputs:
            g.add_edge(f"op{j}", f"op{i}")
    return g


def test_fused_saving_keeps_kernel_inputs_and_recomputes_the_rest():
    # x (external, 2 B) -> fp32 copy (saved 4) -> normed (saved 2, feeds mul) -> mul (saved 2) -> GEMM
    # gate GEMM (saved 6) -> silu (saved 6, feeds mul only) -> product (saved 6) -> down GEMM
    ops = [("_to_copy", "m", 4, 4, 2, []), ("_to_copy", "m", 2, 2, 4, [0]), ("mul", "m", 2, 2, 2, [1]),
           ("mm", "k", 0, 6, 2, [2]), ("mm", "k", 6, 6, 2, [2]), ("silu", "m", 6, 6, 6, [4]),
           ("mul", "m", 6, 6, 12, [5, 4]), ("mm", "k", 0, 2, 6, [6])]
    eager = sum(o[2] for o in ops)
    block = SimpleNamespace(saved_bytes={"none": eager})
    trace = SimpleNamespace(blocks={"dense": block}, graph=_graph(ops))
    assert fused_saved_bytes(trace, "dense", "eager") == eager
    # fused: the fp32 copy (4) becomes its bf16 input (2), normed (2) and silu (6) are recomputed,
    # mul (GEMM input) and the GEMM outputs stay: 2 + 2 + 6 + 6 = 16.
    assert fused_saved_bytes(trace, "dense", "fused") == 16
    # fp8: the two GEMM inputs (2 and 6) keep their fp8 casts (half): 16 - 1 - 3.
    assert fused_saved_bytes(trace, "dense", "fused_fp8") == 12
    # A fused norm beside eager ops: the norm keeps its input and output (2 + 2), the MLP as traced (18).
    assert fused_saved_bytes(trace, "dense", "eager_fused_norm") == 22


def test_saving_rule_follows_the_kernels_and_precision():
    layout = layout_from_dict({"devices": 8})
    assert saving_rule(layout) == "fused"
    assert saving_rule(layout.with_changes(precision="fp8")) == "fused_fp8"
    assert saving_rule(layout.with_changes(kernels={"elementwise": "eager"})) == "eager"
    assert saving_rule(layout.with_changes(kernels={"elementwise": "eager", "norm": "fused"})) == "eager_fused_norm"


# ------------------------------------------------------------------ grouped GEMMs, fp8 casts
def test_grouped_rows_pay_half_a_tile_per_expert():
    assert grouped_rows(1000) == 1000 + GROUP_TILE_ROWS / 2
    assert grouped_rows(0) == 0


def test_fp8_grouped_gemm_quantises_its_tokens_even_with_fused_elementwise():
    profile = load_profile("h100")
    work = RankWork(token_factor=1.0, precision="fp8", fused_elementwise=True, weight_cast_share=0.0)
    assert fp8_cast_time(1024, 2048, 4096, 8, work, profile) == 0.0  # fused into its producer
    grouped = fp8_cast_time(1024, 2048, 4096, 8, work, profile, grouped=True)
    assert grouped == pytest.approx(8 * 1024 * 4096 * 3 / profile.hbm_bandwidth())


# ------------------------------------------------------------------ fits on the allocated peak
def test_fits_on_the_allocated_peak_not_the_reserved_one():
    gib = 2**30
    memory = MemoryBreakdown(parameters=70 * gib, gradients=0, optimizer=0, gathered_parameters=0,
                             activations=5 * gib, logits_loss=0, temporaries=0, overhead=10 * gib)
    assert memory.allocated == 75 * gib and memory.total == 85 * gib
    assert fits_memory(memory, 80 * gib, 0)
    assert not fits_memory(memory, 74 * gib, 0)
    assert memory.gib()["allocated"] == 75


# ------------------------------------------------------------------ fused attention over the blockwise path
def test_flash_prices_the_runtimes_blockwise_attention_as_one_fused_call():
    """MLA runs the runtime's blockwise attention (many matmuls, fp32 softmax ops); a fused
    kernel choice prices its model FLOPs, no softmax traffic, and one tail + launch per pass."""
    from tests.trace_configs import tiny_config
    from xplan.cost_models.compute import attention_tail, group_times, op_time
    from xplan.cost_models.kernels import attention_time
    from xplan.cost_models.ops import priced_ops
    from xplan.planner.trace import trace_model

    trace = trace_model(tiny_config("deepseek_v3"), 64, use_cache=False)
    profile = load_profile("h100")
    ops = [op for op in priced_ops(trace) if op.in_attention_kernel]
    assert any(op.category == "attention" for op in ops) and any(op.category == "memory" for op in ops)
    kind = next(k for k in trace.blocks)
    flash = RankWork(token_factor=1.0, seq_len=64, attention_kernel="flash")
    times = group_times(trace, flash, profile)
    blockwise_sdpa = group_times(trace, RankWork(token_factor=1.0, seq_len=64, attention_kernel="sdpa"), profile)
    assert times[(kind, "forward")] < blockwise_sdpa[(kind, "forward")]
    # The flash forward attention: its FLOPs at the fused rate plus one tail and one launch.
    forward = [op for op in ops if op.category == "attention" and op.phase == "forward" and op.group == kind]
    flops = sum(op.flops for op in forward)
    launch = profile.compute.gemm.overhead_us * 1e-6
    expected = attention_time(profile, flops, 64) + launch  # one call: FLOPs, one tail, one launch
    priced = sum(op_time(op, flash, profile) for op in forward) + attention_tail(profile, flash, False) + launch
    assert priced == pytest.approx(expected, rel=1e-6)
    # Under flash the softmax ops inside the blockwise path cost nothing of their own.
    assert all(op_time(op, flash, profile) == 0.0 for op in ops if op.category == "memory")


def test_interleaved_pipeline_sends_hide_under_compute():
    # Megatron's interleaved 1F1B overlaps p2p with the next chunk's compute (overlap_p2p_comm);
    # 1F1B sends block.
    assert pipeline.exposed_p2p("interleaved", 0.2, 5.0) == 0.0
    assert pipeline.exposed_p2p("interleaved", 6.0, 5.0) == pytest.approx(1.0)
    assert pipeline.exposed_p2p("1f1b", 0.2, 5.0) == 0.2


def test_tp_overlap_takes_sms_from_the_gemms_te_overlaps_by_pipeline_and_bulk():
    from xplan.cost_models.comm import TP_OVERLAP_SM_SHARE, tp_overlap_sm_time, under_tp_sm_margin

    # TE initialize_ub: pipeline for proj/fc2 fprop, bulk for qkv/fc1 dgrad+wgrad (16 SMs, margin);
    # ring_exchange (qkv/fc1 fprop, proj/fc2 dgrad) on the copy engines.
    assert under_tp_sm_margin("self_attn.o_proj", "forward") and under_tp_sm_margin("mlp.down_proj", "forward")
    assert under_tp_sm_margin("self_attn.q_proj", "backward") and under_tp_sm_margin("mlp.up_proj", "backward")
    assert not under_tp_sm_margin("self_attn.q_proj", "forward") and not under_tp_sm_margin("mlp.down_proj", "backward")
    assert not under_tp_sm_margin("mlp.experts.down_proj", "forward") and not under_tp_sm_margin("mlp.gate", "backward")
    assert TP_OVERLAP_SM_SHARE == pytest.approx(16 / 132)
    assert tp_overlap_sm_time(1.16) == pytest.approx(0.16)  # 116 of 132 SMs: 1.16 s of work takes 1.32 s


def test_moe_layers_tp_collectives_follow_the_expert_dispatcher():
    from xplan.cost_models.comm import all_gather_time, reduce_scatter_time, tensor_parallel_time

    h800 = load_profile("h800")
    full = 4096 * 1024 * 2

    def one(nbytes, group):
        return all_gather_time(h800, nbytes, group, 1, 16) + reduce_scatter_time(h800, nbytes, group, 1, 16)

    dense = layout_from_dict({"devices": 16, "tp": 2, "dp_mode": "zero1"})
    assert tensor_parallel_time(h800, 4096, 1024, dense, 2) == pytest.approx(4 * one(full, 2))
    # Expert TP 2 (ep 2 inside dp_world 8): the routed tokens (top-k x imbalance copies) gathered and
    # reduce-scattered over the expert-TP group; no shared expert: no dense MLP collectives.
    etp = layout_from_dict({"devices": 16, "tp": 2, "ep": 2, "dp_mode": "zero1"})
    assert etp.expert_tp == 2
    assert tensor_parallel_time(h800, 4096, 1024, etp, 2, routed_copies=8 * 1.3, dense_mlp=False) == pytest.approx(
        2 * one(full, 2) + 2 * one(full * 8 * 1.3, 2))
    # EP spanning the TP ranks (expert TP 1): the experts run on each rank's own sequence shard.
    span = layout_from_dict({"devices": 16, "tp": 2, "ep": 16, "dp_mode": "zero1"})
    assert span.expert_tp == 1
    assert tensor_parallel_time(h800, 4096, 1024, span, 2, routed_copies=8, dense_mlp=False) == pytest.approx(
        2 * one(full, 2))
    assert tensor_parallel_time(h800, 4096, 1024, span, 2, routed_copies=8, dense_mlp=True) == pytest.approx(
        4 * one(full, 2))  # a shared expert gathers and scatters as a dense MLP does
