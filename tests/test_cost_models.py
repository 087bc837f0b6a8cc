"""Cost-model components against hand-computable cases, and layout checks."""

from __future__ import annotations

import json

import pytest

from xplan.cli import main
from xplan.cost_models import comm
from xplan.cost_models.memory import model_state_bytes
from xplan.errors import InputError
from xplan.hw_profiles import load_profile
from xplan.layout import check_layout, layout_from_dict
from xplan.runtime import load_config


def test_model_state_bytes_for_known_sharding():
    # 235.1e9 parameters over 256 FSDP ranks: 4 B master + 4 B grad + 8 B AdamW = 16 B each.
    params, grads, optim, off = model_state_bytes(235.1e9 / 256, ())
    assert params == pytest.approx(235.1e9 / 256 * 4)
    assert grads == pytest.approx(235.1e9 / 256 * 4)
    assert optim == pytest.approx(235.1e9 / 256 * 8)
    assert off == 0
    _, _, optim, off = model_state_bytes(1e9, ("optimizer",))
    assert optim == 0 and off == 8e9
    params, grads, optim, off = model_state_bytes(1e9, ("params",))
    assert params == grads == optim == 0 and off == 16e9


def test_all_to_all_time_on_nvlink_level():
    h800 = load_profile("h800")
    nbytes = 1e9
    expected = 7 * 3.33e-6 + (7 / 8) * nbytes / (200e9 * 0.77)
    assert comm.all_to_all_time(h800, nbytes, 8, 1, 256) == pytest.approx(expected)
    # 16 ranks span two nodes: 7/16 of the bytes stay on NVLink while 8/16 cross InfiniBand,
    # concurrently; the slower part sets the time.
    nvlink = (7 / 16) * nbytes / (200e9 * 0.77)
    ib = (8 / 16) * nbytes / (50e9 * 0.8)
    assert comm.all_to_all_time(h800, nbytes, 16, 1, 256) == pytest.approx(15 * 3.7e-6 + max(nvlink, ib))


def test_expert_parallel_time_counts_four_all_to_alls():
    h800 = load_profile("h800")
    layout = layout_from_dict({"devices": 64, "fsdp": 64, "ep": 8})
    one = comm.all_to_all_time(h800, 4096 * 8 * 4096 * 2, 8, 1, 64)
    assert comm.expert_parallel_time(h800, 4096, 4096, 8, layout, 2, 1.0) == pytest.approx(4 * one)
    assert comm.expert_parallel_time(h800, 4096, 4096, 8, layout, 2, 1.5) > 4 * one


def test_attention_op_priced_by_kernel_choice():
    from xplan.cost_models.compute import RankWork, op_time
    from xplan.cost_models.ops import PricedOp

    op = PricedOp(group="dense", phase="forward", category="attention", flops=10**12, flops_dense=2 * 10**12,
                  nbytes=0)
    h100 = load_profile("h100")
    flash = RankWork(token_factor=2.0, seq_len=4096, attention_kernel="flash")
    sdpa = RankWork(token_factor=2.0, seq_len=4096, attention_kernel="sdpa")
    # h100's measured cuDNN fit: efficiency 0.592 x s / (s + 380), a 34 us tail per call, 3.4 us launch;
    # torch SDPA (FlashAttention-2) takes the whole call / 0.547
    eff = 0.592 * 4096 / (4096 + 380)
    assert op_time(op, flash, h100) == pytest.approx(2e12 / (989e12 * eff) + 34e-6 + 3.4e-6)
    assert op_time(op, sdpa, h100) == pytest.approx((2e12 / (989e12 * eff) + 34e-6) / 0.547 + 3.4e-6)
    backward = PricedOp(group="dense", phase="backward", category="attention", flops=2 * 10**12,
                        flops_dense=5 * 10**12, nbytes=0)
    eff_bwd = 0.427 * 4096 / (4096 + 660)
    assert op_time(backward, flash, h100) == pytest.approx(4e12 / (989e12 * eff_bwd) + 102e-6 + 3.4e-6)
    # eager attention (unfused matmuls) has no fused-kernel tail
    eager = RankWork(token_factor=2.0, seq_len=4096, attention_kernel="eager")
    assert op_time(op, eager, h100) == pytest.approx(2e12 / (989e12 * eff) + 3.4e-6)


def test_fp8_casts_fuse_token_operands_and_cache_weights():
    """fp8 operand casts (3 B per element): the token-sized operand only when elementwise kernels
    are not fused; the weight-sized one once per step, a micro-batch paying 1 / micro-batches."""
    from xplan.cost_models.compute import RankWork, fp8_cast_time

    h100 = load_profile("h100")
    bw = 3.35e12 * 0.9
    m, n, k = 8192, 4096, 14336
    fused = RankWork(token_factor=1.0, precision="fp8", weight_cast_share=1 / 16)
    eager = RankWork(token_factor=1.0, precision="fp8", fused_elementwise=False, weight_cast_share=1.0)
    assert fp8_cast_time(m, n, k, 1, fused, h100) == pytest.approx(k * n / 16 * 3 / bw)
    assert fp8_cast_time(m, n, k, 1, eager, h100) == pytest.approx((m * k + k * n) * 3 / bw)
    assert fp8_cast_time(m, n, k, 1, RankWork(token_factor=1.0), h100) == 0.0  # bf16: no casts


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"devices": 256, "fsdp": 256, "ep": 3}, "ep (3)"),
        ({"devices": 256, "fsdp": 256, "ep": 256}, "must divide the number of routed experts"),
        ({"devices": 256, "fsdp": 256, "sp": 3}, "sp (3)"),
        ({"devices": 256, "fsdp": 128, "sp": 128}, "Ulysses sp (128) must divide the attention heads"),
        ({"devices": 256, "fsdp": 100}, "fsdp (100)"),
        ({"devices": 250, "fsdp": 125, "tp": 4}, "devices (250)"),
    ],
)
def test_check_layout_rejects_impossible_layouts(layout, message):
    config = load_config("qwen3-235b-a22b")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(layout_from_dict(layout), config, seq_len=4096)


def test_layout_fields_validated():
    with pytest.raises(InputError, match="devices"):
        layout_from_dict({"devices": 0})
    with pytest.raises(InputError, match="recompute"):
        layout_from_dict({"devices": 8, "recompute": "sometimes"})
    with pytest.raises(InputError, match="offload"):
        layout_from_dict({"devices": 8, "offload": "gpu"})


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def estimate_json(capsys, *args):
    code, out, err = run(["estimate", *args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_estimate_json_contract_and_monotonicity(tiny_moe_dir, capsys):
    base = estimate_json(capsys, tiny_moe_dir, "h800", "--devices", "8", "--seq-len", "256", "--global-batch", "16")
    for key in ("fits", "memory_gib", "step_time_s", "tokens_per_s_per_device", "mfu", "layout"):
        assert key in base
    assert base["memory_gib"]["total"] > 0 and base["layout"]["fsdp"] == 8
    ep = estimate_json(capsys, tiny_moe_dir, "h800", "--devices", "8", "--ep", "4", "--seq-len", "256",
                       "--global-batch", "16")
    # Experts split over EP: less to gather per block, same sharded model states.
    assert ep["memory_gib"]["gathered_parameters"] < base["memory_gib"]["gathered_parameters"]
    assert ep["memory_gib"]["parameters"] == pytest.approx(base["memory_gib"]["parameters"])
    full = estimate_json(capsys, tiny_moe_dir, "h800", "--devices", "8", "--recompute", "full", "--seq-len", "256",
                         "--global-batch", "16")
    assert full["memory_gib"]["activations"] < base["memory_gib"]["activations"]
    assert full["time_s"]["recompute"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "0"], "--devices"),
        (["--devices", "8", "--ep", "3"], "ep (3)"),
        (["--devices", "8", "--sp", "8"], "Ulysses sp (8)"),
        (["--devices", "8", "--tp", "3"], "devices (8)"),
        (["--devices", "8", "--recompute", "maybe"], "recompute"),
    ],
)
def test_estimate_bad_input_exits_2(tiny_moe_dir, capsys, args, message):
    code, _, err = run(["estimate", tiny_moe_dir, "h800", "--seq-len", "256", *args], capsys)
    assert code == 2
    assert message in " ".join(err.split())


def test_estimate_unknown_profile_exits_2(tiny_moe_dir, capsys):
    code, _, err = run(["estimate", tiny_moe_dir, "h900", "--devices", "8"], capsys)
    assert code == 2 and "h800" in err


def test_ring_bandwidth_uses_every_nic_of_a_node():
    # FSDP over 64 H100 (8 nodes x 8): 8 rings side by side, one per NIC, each crossing every node
    # boundary once: busBw = min(NVLink 450 x 0.82, 8 x 50 x 0.94) = 369 GB/s, not one NIC's 47.
    h100 = load_profile("h100")
    assert comm.ring_bandwidth(h100, "all_gather", 64, 1, 64) == pytest.approx(min(450e9 * 0.82, 8 * 50e9 * 0.94))
    # Two members per node (stride 4): two NICs carry the outer hops.
    assert comm.ring_bandwidth(h100, "all_gather", 16, 4, 64) == pytest.approx(2 * 50e9 * 0.94)
    # One member per node (stride 8, e.g. the DP group of TP 8): one NIC's worth.
    assert comm.ring_bandwidth(h100, "all_gather", 8, 8, 64) == pytest.approx(50e9 * 0.94)
    # Inside a node: the NVLink level.
    assert comm.ring_bandwidth(h100, "all_gather", 8, 1, 64) == pytest.approx(450e9 * 0.82)
    nbytes = 1e9
    expected = 63 * 3.7e-6 + (63 / 64) * nbytes / (450e9 * 0.82)
    assert comm.all_gather_time(h100, nbytes, 64, 1, 64) == pytest.approx(expected)
    assert comm.all_reduce_time(h100, nbytes, 64, 1, 64) == pytest.approx(
        126 * 3.7e-6 + 2 * (63 / 64) * nbytes / (450e9 * 0.82))


def test_selective_recompute_redoes_unsaved_ops_and_every_second_mm():
    from xplan.cost_models.compute import redone_by_selective
    from xplan.cost_models.ops import PricedOp

    def op(name, saved=True, phase="forward", group="dense"):
        return PricedOp(group=group, phase=phase, category="gemm" if name == "mm" else "memory", flops=0,
                        flops_dense=0, nbytes=0, op=name, selective_saved=saved)

    block = [op("mul", saved=False), op("mm"), op("mm"), op("mm"), op("silu", saved=False), op("mm")]
    seen: dict[str, int] = {}
    assert [redone_by_selective(o, seen, 0) for o in block] == [True, False, False, False, True, False]
    seen = {}
    # torchtitan op SAC: the 2nd and 4th mm of the block are redone, the 1st and 3rd kept.
    assert [redone_by_selective(o, seen, 2) for o in block] == [True, False, True, False, True, True]
    assert not redone_by_selective(op("mul", saved=False, phase="backward"), {}, 2)


def test_selective_recompute_priced_by_time_not_flops():
    """Recomputing the memory-bound ops costs their forward time although they have no FLOPs."""
    from xplan.cost_models.compute import RankWork, group_times
    from xplan.cost_models.kernels import gemm_time
    from xplan.cost_models.ops import PricedOp

    class Trace:
        pass

    trace = Trace()
    trace._priced_ops = [
        PricedOp(group="dense", phase="forward", category="memory", flops=0, flops_dense=0, nbytes=3 * 10**9,
                 fused_nbytes=3 * 10**9, op="mul", selective_saved=False),
        PricedOp(group="dense", phase="forward", category="gemm", flops=2 * 4096**3, flops_dense=2 * 4096**3,
                 nbytes=0, dims=(4096, 4096, 4096), op="mm"),
        PricedOp(group="dense", phase="forward", category="gemm", flops=2 * 4096**3, flops_dense=2 * 4096**3,
                 nbytes=0, dims=(4096, 4096, 4096), op="mm"),
    ]
    h100 = load_profile("h100")
    mem = 3e9 / (3.35e12 * 0.9) + 3.4e-6
    gemm = gemm_time(h100, 4096, 4096, 4096)
    times = group_times(trace, RankWork(token_factor=1.0), h100)
    assert times[("dense", "forward")] == pytest.approx(mem + 2 * gemm)
    assert times[("dense", "selective_recompute")] == pytest.approx(mem)
    times = group_times(trace, RankWork(token_factor=1.0, recompute_every_mm=2), h100)
    assert times[("dense", "selective_recompute")] == pytest.approx(mem + gemm)


def _tiny_estimate(layout_values: dict, profile_name: str = "h100"):
    from tests.trace_configs import tiny_config
    from xplan.cost_models import estimate
    from xplan.planner.trace import trace_model

    config = tiny_config("qwen3")
    trace = trace_model(config, 64, loss="full", use_cache=False)
    layout = layout_from_dict(layout_values)
    return estimate(trace, config, layout, load_profile(profile_name), global_batch=layout.devices), trace


def test_pricing_context_prices_each_trace_and_work_once():
    """A search passes one PricingContext to every estimate: the same numbers as pricing alone,
    each (trace, rank work) priced once, traces told apart by identity, one profile per context."""
    from tests.trace_configs import tiny_config
    from xplan.cost_models import PricingContext, estimate
    from xplan.cost_models.compute import RankWork, group_times
    from xplan.planner.trace import trace_model

    config = tiny_config("qwen3")
    full, chunked = (trace_model(config, 64, loss=loss, use_cache=False) for loss in ("full", "chunked"))
    h100 = load_profile("h100")
    pricing = PricingContext(h100)
    work = RankWork(token_factor=1.0, seq_len=64)
    times = pricing.group_times(full, work)
    assert times == group_times(full, work, h100)
    assert pricing.group_times(full, work) is times  # priced once
    assert pricing.group_times(chunked, work) == group_times(chunked, work, h100)
    assert pricing.group_times(chunked, work) is not times
    for values in ({"devices": 2, "fsdp": 2}, {"devices": 2, "fsdp": 2, "micro_batch": 2, "recompute": "full"}):
        layout = layout_from_dict(values)
        alone = estimate(full, config, layout, h100, global_batch=4)
        assert estimate(full, config, layout, h100, global_batch=4, pricing=pricing) == alone
    with pytest.raises(ValueError, match="pricing context"):
        estimate(full, config, layout, load_profile("h800"), global_batch=4, pricing=pricing)


def test_allocator_fragmentation_adds_its_fraction_of_the_allocated_peak():
    est, _ = _tiny_estimate({"devices": 2, "fsdp": 2})  # the default allocator: expandable segments
    m = est.memory
    allocated = m.total - m.overhead
    assert m.overhead == pytest.approx(0.114 * allocated)  # h100: expandable segments (STAlloc's MoE run)
    caching, _ = _tiny_estimate({"devices": 2, "fsdp": 2, "allocator": "caching"})
    allocated = caching.memory.total - caching.memory.overhead
    assert caching.memory.overhead == pytest.approx(0.176 * allocated)  # PyTorch caching allocator (GMLake)
    cpu, _ = _tiny_estimate({"devices": 2, "fsdp": 2}, "cpu")
    assert cpu.memory.overhead == 0.0


def test_overlapped_tensor_parallel_collectives_hide_under_the_layer_gemms():
    from xplan.cost_models.compute import group_times
    from xplan.cost_models.estimate import rank_work

    base = {"devices": 2, "fsdp": 1, "tp": 2, "kernels": {"attention": "flash", "loss": "full"}}
    exposed, trace = _tiny_estimate(base)
    overlapped, _ = _tiny_estimate({**base, "tp_comm": "overlapped"})
    assert exposed.time["tensor_parallel"] > 0
    # Exposed: every collective on the critical path; overlapped: only what exceeds the GEMMs.
    h100 = load_profile("h100")
    work = rank_work(trace, layout_from_dict(base))
    times = group_times(trace, work, h100)
    gemm = sum(block.count * times.get((kind, "gemm"), 0.0) for kind, block in trace.blocks.items())
    # ... plus the SMs TE's pipeline and bulk overlaps take from the GEMMs they run beside.
    margin = sum(block.count * times.get((kind, "gemm_tp_margin"), 0.0) for kind, block in trace.blocks.items())
    assert 0 < margin < gemm
    per_step = exposed.time["tensor_parallel"]
    assert overlapped.time["tensor_parallel"] == pytest.approx(
        max(0.0, per_step - exposed.grad_accum * gemm) + exposed.grad_accum * margin * 16 / 116)
    # (device time: this tiny model is host-bound on h100, which would hide the difference)
    assert (overlapped.step_time_s - overlapped.time["host_bound"]
            < exposed.step_time_s - exposed.time["host_bound"])


def test_host_dispatch_floor_binds_only_when_the_host_is_slower_than_the_device():
    """A micro-batch takes at least its host-issued ops x host.dispatch_us (h100: 47 us, measured
    with xplan's runtime); eager elementwise kernels issue every traced op, fused ones fewer; a
    profile without dispatch_us (a100) prices none."""
    from xplan.cost_models.compute import group_times
    from xplan.cost_models.estimate import rank_work

    eager_layout = {"devices": 1, "fsdp": 1, "kernels": {"elementwise": "eager", "loss": "full"}}
    eager, trace = _tiny_estimate(eager_layout)
    ops = sum(block.count * group_times(trace, rank_work(trace, layout_from_dict(eager_layout)),
                                        load_profile("h100")).get((kind, "ops"), 0.0)
              for kind, block in trace.blocks.items())
    assert ops == sum(block.count * sum(1 for n, d in block_ops(trace, kind)) for kind, block in trace.blocks.items())
    assert eager.time["host_bound"] > 0  # a tiny model: the host is the bottleneck
    device = sum(v for k, v in eager.time.items() if k not in ("host_bound", "optimizer"))
    assert device + eager.time["host_bound"] >= ops * 47e-6 * eager.grad_accum
    fused, _ = _tiny_estimate({**eager_layout, "kernels": {"elementwise": "fused", "loss": "full"}})
    assert fused.time["host_bound"] < eager.time["host_bound"]
    a100, _ = _tiny_estimate(eager_layout, "a100")
    assert a100.time["host_bound"] == 0.0
    # full recompute issues the forward's ops again
    redo, _ = _tiny_estimate({**eager_layout, "recompute": "full"})
    device_redo = sum(v for k, v in redo.time.items() if k not in ("host_bound", "optimizer"))
    assert device_redo + redo.time["host_bound"] > device + eager.time["host_bound"]


def block_ops(trace, kind: str):
    """The traced op nodes of one block kind."""
    return [(n, d) for n, d in trace.graph.nodes(data=True) if d.get("type") == "op" and d.get("stage") == kind]


def test_pipeline_ranks_split_layers_as_megatron_does():
    from xplan.cost_models.estimate import PipelineRank, pipeline_ranks

    assert pipeline_ranks(48, 1) == [(PipelineRank(48, first=True, last=True), 1)]
    # even split: the embedding and the head ride on the edge ranks
    assert pipeline_ranks(48, 2) == [(PipelineRank(24, first=True, last=False), 1),
                                     (PipelineRank(24, first=False, last=True), 1)]
    assert pipeline_ranks(80, 8, 5)[1] == (PipelineRank(10, first=False, last=False), 6)
    # 94 layers on 32 x 3 chunks: embedding and loss take a slot each, the edge ranks run 2 layers
    assert pipeline_ranks(94, 32, 3) == [(PipelineRank(2, first=True, last=False), 1),
                                         (PipelineRank(3, first=False, last=False), 30),
                                         (PipelineRank(2, first=False, last=True), 1)]
    assert pipeline_ranks(7, 2)[0][0].layers == 3.5  # neither divides: spread evenly
    assert PipelineRank(3, first=False, last=True).parts() == ("rotary", "model", "norm", "head", "loss")


def test_slowest_pipeline_rank_sets_the_pace_and_the_mean_rank_the_bubble():
    """pp 2 on the 2-layer model: one layer per rank, the LM head and loss on the last rank only."""
    from xplan.cost_models.compute import group_times
    from xplan.cost_models.estimate import rank_work

    values = {"devices": 2, "fsdp": 1, "pp": 2, "kernels": {"attention": "flash", "loss": "full"}}
    est, trace = _tiny_estimate(values, "a100")  # a100: no host floor, device time only
    times = group_times(trace, rank_work(trace, layout_from_dict(values)), load_profile("a100"))

    def run(names):
        return sum(times.get((name, phase), 0.0) for name in names for phase in ("forward", "backward"))

    (kind, block), = trace.blocks.items()
    layer = run([kind])
    first = layer + run(["rotary", "model", "embed"])
    last = layer + run(["rotary", "model", "norm", "head", "loss"])
    assert last > first
    assert est.time["compute"] == pytest.approx(est.grad_accum * last)
    micro_last = (est.time["compute"] + est.time["pipeline_p2p"]) / est.grad_accum
    micro_first = micro_last - last + first
    assert est.time["pipeline_bubble"] == pytest.approx((micro_first + micro_last) / 2)


# ---------------------------------------------------------------------- kernels: the formulas by hand
def _with_gemm(name: str, **gemm) -> object:
    """A shipped profile with some `compute.gemm` fields replaced."""
    from xplan.hw_profiles import profile_from_dict

    data = load_profile(name).to_dict()
    data["compute"]["gemm"].update(gemm)
    return profile_from_dict(data)


def test_roofline_is_the_slower_of_compute_and_memory_plus_overhead():
    from xplan.cost_models.kernels import roofline_time

    # 1 TFLOP at 1 PFLOP/s = 1 ms; 3 GB at 1 TB/s = 3 ms: memory-bound, plus 0.5 ms overhead
    assert roofline_time(1e12, 1e15, 2e9, 1e9, 1e12, 5e-4) == pytest.approx(3.5e-3)
    # 10x the FLOPs: compute-bound at 10 ms
    assert roofline_time(1e13, 1e15, 2e9, 1e9, 1e12, 5e-4) == pytest.approx(10.5e-3)
    # an epilogue of 0.5: the output's 1 ms leaves the max and half of it comes after
    assert roofline_time(1e12, 1e15, 2e9, 1e9, 1e12, 5e-4, epilogue_fraction=0.5) == pytest.approx(
        max(1e-3, 2e-3) + 0.5e-3 + 5e-4)


def test_gemm_time_by_hand():
    from xplan.cost_models.kernels import gemm_bytes, gemm_efficiency, gemm_flops, gemm_time

    assert gemm_flops(2, 3, 4, groups=5) == 2 * 2 * 3 * 4 * 5
    assert gemm_bytes(2, 3, 4, "bf16") == ((2 * 4 + 4 * 3) * 2, 2 * 3 * 2)
    assert gemm_bytes(2, 3, 4, "float8_e4m3fn", groups=2) == (2 * (2 * 4 + 4 * 3) * 1, 2 * 2 * 3 * 2)  # fp8 writes bf16
    assert gemm_bytes(2, 3, 4, "fp32") == ((2 * 4 + 4 * 3) * 4, 2 * 3 * 4)
    p = load_profile("h800")  # bf16 989 TFLOPS x 0.675, HBM 3.35 TB/s x 0.9, epilogue 1.0, 3.4 us
    bw = 3.35e12 * 0.9
    # a big square bf16 GEMM: compute-bound at the max fraction, then the output write
    n = 8192
    t = gemm_time(p, n, n, n)
    assert t == pytest.approx(2 * n**3 / (989e12 * 0.675) + n * n * 2 / bw + 3.4e-6)
    assert gemm_efficiency(p, n, n, n) == pytest.approx(2 * n**3 / (989e12 * t))
    # a tiny GEMM: HBM-bound (inputs, then the output) plus the overhead
    assert gemm_time(p, 16, 128, 128) == pytest.approx(((16 * 128 + 128 * 128) * 2 + 16 * 128 * 2) / bw + 3.4e-6)
    assert gemm_efficiency(p, 0, 128, 128) == 0.0
    # a grouped call pays the overhead once
    one = gemm_time(p, 4096, 4096, 4096) - 3.4e-6
    assert gemm_time(p, 4096, 4096, 4096, groups=8) == pytest.approx(8 * one + 3.4e-6)
    with pytest.raises(ValueError, match="m=-1"):
        gemm_time(p, -1, 8, 8)
    with pytest.raises(ValueError, match="groups=0"):
        gemm_time(p, 8, 8, 8, groups=0)
    with pytest.raises(InputError, match="no fp8"):
        gemm_time(load_profile("a100"), 8, 8, 8, "fp8")


def test_gemm_epilogue_fraction_adds_the_output_write():
    from xplan.cost_models.kernels import gemm_efficiency, gemm_time

    # fp8 on H800, M = N = 8192, K = 256 (the shallow end of the tilelang K sweep the fraction is
    # fitted to): main loop 2MNK / (1979e12 x 0.609), inputs (MK + KN) x 1 B, output MN x 2 B.
    m = n = 8192
    k = 256
    bw = 3.35e12 * 0.9
    loop = 2 * m * n * k / (1979e12 * 0.609)
    inputs, output = (m * k + k * n) * 1, m * n * 2
    for fraction, expected in ((None, max(loop, (inputs + output) / bw)),
                               (1.0, max(loop, inputs / bw) + output / bw),
                               (0.5, max(loop, inputs / bw) + 0.5 * output / bw)):
        p = _with_gemm("h800", epilogue_fraction=fraction)
        assert gemm_time(p, m, n, k, "fp8") == pytest.approx(expected + 3.4e-6)
    # the shallow GEMM loses more to the epilogue than a deep one
    p = load_profile("h800")
    assert gemm_efficiency(p, m, n, 256, "fp8") < 0.6 * gemm_efficiency(p, m, n, 16384, "fp8")


def test_width_alignment():
    from xplan.cost_models.kernels import width_alignment

    assert width_alignment(4096, 2048) is None
    assert width_alignment(5461, 2048) == "odd"
    assert width_alignment(2048, 5461) == "odd"
    assert width_alignment(5462, 2048) == "even"  # even, but 5462 % 8 == 6
    assert width_alignment(4096.5, 8) == "odd"  # a fractional width (a split that does not divide)


def test_unaligned_bf16_widths_leave_the_tensor_core_fast_path():
    """h100 (measured): a bf16 GEMM whose n or k is odd runs at 0.135 of the peak, one whose widths
    are even but not multiples of 8 at 0.239; aligned widths, the token dimension m and fp8 (padded
    by its stacks) are unaffected."""
    from xplan.cost_models.kernels import gemm_rate, gemm_time

    p = load_profile("h100")
    m = 4096
    aligned = gemm_time(p, m, 5464, 2048)
    bw = 3.35e12 * 0.9  # the output write after the K loop (epilogue_fraction 1.0)
    assert gemm_time(p, m, 5461, 2048) == pytest.approx(2 * m * 5461 * 2048 / (989e12 * 0.135) + m * 5461 * 2 / bw
                                                        + 3.4e-6)
    assert gemm_time(p, m, 2048, 5461) > 4 * aligned * 5461 / 5464
    assert gemm_time(p, m, 5462, 2048) == pytest.approx(2 * m * 5462 * 2048 / (989e12 * 0.239) + m * 5462 * 2 / bw
                                                        + 3.4e-6)
    assert gemm_time(p, m + 1, 5464, 2048) == pytest.approx(aligned * (m + 1) / m, rel=0.01)
    assert gemm_time(p, m, 5461, 2048, "fp8") < 1.1 * gemm_time(p, m, 5464, 2048, "fp8")
    assert gemm_rate(p, 5461, 2048, "fp8") == gemm_rate(p, 5464, 2048, "fp8")
    assert load_profile("a100").compute.gemm.unaligned is None  # not measured there


@pytest.mark.parametrize("name", ["a100", "a3", "ascend-910b", "cpu", "h100", "h200", "h800"])
def test_gemm_efficiency_monotone_and_below_max(name):
    from xplan.cost_models.kernels import gemm_efficiency

    p = load_profile(name)
    sizes = [1, 8, 64, 256, 1024, 4096, 16384]
    for dtype in ("bf16", "fp8", "fp32"):
        cap = getattr(p.compute.gemm.max_fraction, dtype)
        if cap is None:
            continue
        for axis in range(3):
            effs = []
            for s in sizes:
                dims = [2048, 2048, 2048]
                dims[axis] = s
                effs.append(gemm_efficiency(p, *dims, dtype=dtype))
            assert all(a < b for a, b in zip(effs, effs[1:], strict=False)), (name, dtype, axis, effs)
            assert all(0 < e < cap for e in effs)
        grouped = [gemm_efficiency(p, 128, 1536, 4096, dtype, groups=g) for g in (1, 4, 16, 64)]
        assert all(a < b for a, b in zip(grouped, grouped[1:], strict=False))
    # small per-expert GEMMs are far from the (tensor-core) peak
    assert gemm_efficiency(p, 16, 1536, 4096, "bf16") < 0.5 * p.compute.gemm.max_fraction.bf16


def test_attention_by_hand():
    from xplan.cost_models.kernels import attention_efficiency, attention_time, causal_attention_flops

    # causal: half of 4 b h s^2 d (qk and v dims equal), backward twice the forward
    assert causal_attention_flops(1, 16, 4096, 128, 128) == 4 * 16 * 4096**2 * 128 / 2
    assert causal_attention_flops(2, 16, 4096, 192, 128, backward=True) == 2 * (2 * 2 * 16 * 4096**2 * 320 / 2)
    p = load_profile("h800")  # forward 0.592 at half_seq 380, tail 34 us; backward 0.427 at 660, 102 us
    assert attention_efficiency(p, 380) == pytest.approx(0.592 / 2)
    assert attention_efficiency(p, 660, backward=True) == pytest.approx(0.427 / 2)
    # one call: FLOPs at that efficiency plus the per-call tail; unfused (eager) matmuls pay no tail
    assert attention_time(p, 1e12, 380) == pytest.approx(1e12 / (989e12 * 0.592 / 2) + 34e-6)
    assert attention_time(p, 1e12, 660, backward=True) == pytest.approx(1e12 / (989e12 * 0.427 / 2) + 102e-6)
    assert attention_time(p, 1e12, 380, kernel="eager") == pytest.approx(1e12 / (989e12 * 0.592 / 2))
    assert attention_time(load_profile("a100"), 1e12, 210) == pytest.approx(1e12 / (312e12 * 0.73 / 2))  # no tail
    with pytest.raises(ValueError, match="seq_len"):
        attention_efficiency(p, 0)


@pytest.mark.parametrize("name", ["a100", "a3", "ascend-910b", "cpu", "h100", "h200", "h800"])
def test_attention_efficiency_rises_with_length(name):
    from xplan.cost_models.kernels import attention_efficiency

    p = load_profile(name)
    for bwd in (False, True):
        effs = [attention_efficiency(p, s, backward=bwd) for s in (128, 512, 2048, 8192, 65536)]
        assert all(a <= b for a, b in zip(effs, effs[1:], strict=False))
        cap = (p.compute.attention.backward if bwd else p.compute.attention.forward).max_fraction
        assert all(0 < e <= cap for e in effs)


def test_sdpa_and_flash1_attention_fractions():
    from xplan.cost_models.kernels import attention_efficiency, attention_time

    h100, a100 = load_profile("h100"), load_profile("a100")
    flash = attention_efficiency(h100, 4096)
    assert attention_efficiency(h100, 4096, kernel="sdpa") == pytest.approx(0.547 * flash)
    assert attention_efficiency(h100, 4096, backward=True, kernel="sdpa") == pytest.approx(
        0.547 * attention_efficiency(h100, 4096, backward=True))
    assert attention_time(h100, 1e12, 4096, kernel="sdpa") == pytest.approx(attention_time(h100, 1e12, 4096) / 0.547)
    # A100: torch SDPA runs FlashAttention-2, the kernel the profile's fit describes
    assert a100.compute.attention.sdpa_fraction is None
    assert attention_efficiency(a100, 4096, kernel="sdpa") == attention_efficiency(a100, 4096)
    # FlashAttention-2 paper: FA2 is about 2x FlashAttention-1 on A100.
    assert attention_efficiency(a100, 4096, kernel="flash1") == pytest.approx(0.5 * attention_efficiency(a100, 4096))
    with pytest.raises(InputError, match="FlashAttention-1"):
        attention_efficiency(h100, 4096, kernel="flash1")


def test_memory_time_at_the_achievable_bandwidth():
    from xplan.cost_models.kernels import memory_time

    assert memory_time(load_profile("h800"), 3.35e12 * 0.9) == pytest.approx(1.0)


def test_collective_bandwidth_per_level_kind_and_topology():
    from xplan.cost_models.kernels import collective_bandwidth

    h800 = load_profile("h800")
    assert collective_bandwidth(h800, 0, "all_gather") == pytest.approx(200e9 * 0.8)
    assert collective_bandwidth(h800, "nvlink", "all_to_all") == pytest.approx(200e9 * 0.77)
    assert collective_bandwidth(h800, "ib", "all_to_all") == pytest.approx(50e9 * 0.8)
    assert collective_bandwidth(h800, 1, "reduce_scatter") == pytest.approx(47e9)
    a3 = load_profile("a3")
    assert collective_bandwidth(a3, 1, "all_to_all") == pytest.approx(392e9 * 0.68)
    assert collective_bandwidth(a3, 2, "all_gather") == pytest.approx(50e9 * 0.7)
    # full mesh (910B: 8 NPUs, 7 links each): a group of n uses n-1 of them
    b = load_profile("ascend-910b")
    full = 196e9 * 0.7
    assert collective_bandwidth(b, 0, "all_gather") == pytest.approx(full)
    assert collective_bandwidth(b, 0, "all_gather", group_size=8) == pytest.approx(full)
    assert collective_bandwidth(b, 0, "all_gather", group_size=4) == pytest.approx(full * 3 / 7)
    assert collective_bandwidth(b, 0, "all_gather", group_size=2) == pytest.approx(full / 7)
    assert collective_bandwidth(b, 1, "all_gather", group_size=2) == pytest.approx(25e9 * 0.7)
    with pytest.raises(ValueError, match="broadcast"):
        collective_bandwidth(h800, 0, "broadcast")


def test_alpha_beta_terms_by_hand():
    from xplan.cost_models.kernels import alpha_beta_time, collective_terms

    s = 1.2e6
    # 4 ranks: a ring all-gather / reduce-scatter / all-to-all moves 3/4 of the buffer in 3 steps,
    # an all-reduce (reduce-scatter then all-gather) twice that, a p2p the message in one step
    assert collective_terms("all_gather", s, 4) == (3.0, pytest.approx(0.9e6))
    assert collective_terms("reduce_scatter", s, 4) == (3.0, pytest.approx(0.9e6))
    assert collective_terms("all_to_all", s, 4) == (3.0, pytest.approx(0.9e6))
    assert collective_terms("all_reduce", s, 4) == (6.0, pytest.approx(1.8e6))
    assert collective_terms("p2p", s, 2) == (1.0, s)
    # alpha 2 us, beta 1 GB/s
    assert alpha_beta_time("all_gather", s, 4, 2e-6, 1e9) == pytest.approx(3 * 2e-6 + 0.9e6 / 1e9)
    assert alpha_beta_time("all_reduce", s, 4, 2e-6, 1e9) == pytest.approx(6 * 2e-6 + 1.8e6 / 1e9)
    assert alpha_beta_time("p2p", s, 2, 2e-6, 1e9) == pytest.approx(2e-6 + 1.2e6 / 1e9)
    assert alpha_beta_time("all_gather", s, 1, 2e-6, 1e9) == 0.0
    assert alpha_beta_time("all_gather", 0.0, 4, 2e-6, 1e9) == 0.0
    with pytest.raises(ValueError, match="broadcast"):
        collective_terms("broadcast", s, 4)


def test_collective_time_on_the_level_the_group_spans():
    from xplan.cost_models.kernels import collective_time

    p = load_profile("h800")  # NVLink 200 GB/s x 0.8, 3.33 us; IB busbw 47 GB/s, 3.7 us
    gib = 2**30
    # 8 consecutive GPUs: one NVLink island
    assert collective_time(p, "all_gather", gib, 8) == pytest.approx(7 * 3.33e-6 + 7 / 8 * gib / 160e9)
    # 16: two nodes, so the network level's latency and bandwidth
    assert collective_time(p, "all_reduce", gib, 16) == pytest.approx(30 * 3.7e-6 + 2 * 15 / 16 * gib / 47e9)
    # a pipeline send between ranks 8 apart crosses nodes
    assert collective_time(p, "p2p", 1e6, 2, stride=8) == pytest.approx(3.7e-6 + 1e6 / 47e9)
    assert collective_time(p, "all_gather", gib, 1) == 0.0
    with pytest.raises(ValueError, match="broadcast"):
        collective_time(p, "broadcast", gib, 1)


def test_ring_collective_time_is_the_alpha_beta_model_at_the_ring_bandwidth():
    p = load_profile("h800")
    gib = 2**30
    # FSDP over 64 GPUs = 8 nodes, 8 per node: every NIC carries a ring (busBw min(160, 8 x 47) GB/s)
    busbw = min(200e9 * 0.8, 8 * 47e9)
    assert comm.ring_bandwidth(p, "all_gather", 64, 1, 64) == pytest.approx(busbw)
    assert comm.all_gather_time(p, gib, 64, 1, 64) == pytest.approx(63 * 3.7e-6 + 63 / 64 * gib / busbw)
    assert comm.all_reduce_time(p, gib, 64, 1, 64) == pytest.approx(126 * 3.7e-6 + 2 * 63 / 64 * gib / busbw)


def test_zero1_single_micro_batch_grows_gradients_during_backward():
    """ZeRO-1 makes each fp32 gradient buffer at the parameter's first gradient of the step: with
    one micro-batch the backward's worst moment holds only the buffers of the units already
    done (the dry run measures 2.9 GiB at qwen3-8b's last layer, memory_matrix row 26); with two,
    every buffer from the first micro-batch. Priced with eager elementwise ops, as the dry run
    executes the blocks: with fused ones the saved activations shrink (the fused-kernel saving)
    and the worst moment of a single micro-batch is the end of the backward, with every buffer."""
    from xplan.planner.pricing import Workload, price

    layout = layout_from_dict({"devices": 8, "dp_mode": "zero1", "recompute": "none",
                               "kernels": {"elementwise": "eager"}})
    one = price(Workload("qwen3-8b", "h800", 4096, 8), layout)
    two = price(Workload("qwen3-8b", "h800", 4096, 16), layout)
    full = 8.19e9 * 4  # every parameter's fp32 buffer
    assert two.memory.gradients == pytest.approx(full, rel=0.01)
    assert one.memory.gradients < 0.2 * full
    assert one.memory.total < two.memory.total


def test_zero1_offload_keeps_gradient_buffers_and_weights_on_the_device():
    """ZeRO-1 offload (optimizer or params) moves the fp32 masters and AdamW moments to the host;
    the replicated compute-dtype weights and fp32 gradient buffers stay (runtime/distributed/zero1.py),
    and the sharded masters are counted (4 B per parameter over the ranks) where they are kept."""
    from xplan.planner.pricing import Workload, price

    work = Workload("qwen3-8b", "h800", 4096, 16)
    base = price(work, layout_from_dict({"devices": 8, "dp_mode": "zero1", "recompute": "full"})).memory
    numel = base.gradients / 4
    assert base.parameters == pytest.approx(numel * 2 + numel * 4 / 8, rel=1e-9)  # bf16 replica + fp32 master shard
    for offload in ("optimizer", "params"):
        mem = price(work, layout_from_dict({"devices": 8, "dp_mode": "zero1", "recompute": "full",
                                            "offload": offload})).memory
        assert mem.gradients == base.gradients and mem.optimizer == 0.0
        assert mem.parameters == pytest.approx(base.parameters - (numel * 4 / 8 if offload == "params" else 0))


def test_fp8_prices_only_the_gemms_the_runtime_converts():
    """runtime/precision.py converts the blocks' aligned linear layers; the LM head, routers and
    routed-expert grouped GEMMs stay bf16 (precision_executed.kept_bf16), and are priced so."""
    from xplan.cost_models.compute import RankWork, gemm_precision, op_time
    from xplan.cost_models.ops import priced_ops
    from xplan.planner.pricing import get_trace

    profile = load_profile("h100")
    ops = [op for op in priced_ops(get_trace("qwen3-30b-a3b", 4096, "chunked")) if op.category in ("gemm", "grouped")]
    kinds = {}
    for op in ops:
        kind = ("head" if op.group == "head" else "router" if op.module == "mlp.gate"
                else "experts" if op.category == "grouped" else "linear")
        kinds.setdefault(kind, set()).add(gemm_precision(op, "fp8"))
        bf16, fp8 = (op_time(op, RankWork(1.0, precision=p), profile) for p in ("bf16", "fp8"))
        assert (fp8 == bf16) == (kind != "linear"), (kind, op)
    assert kinds == {"head": {"bf16"}, "router": {"bf16"}, "experts": {"bf16"}, "linear": {"fp8"}}
    assert {gemm_precision(op, p) for op in ops for p in ("bf16", "fp32")} == {"bf16", "fp32"}


def test_moe_gemm_loop_prices_one_gemm_per_local_expert():
    """kernels.moe_gemm loop (runtime/models/grouped.py: one matmul per expert) pays each expert's
    GEMM and launch on its own, priced as plain GEMMs of the expert's rows; grouped_mm one call
    for all, each expert's last M tile padded (`grouped_rows`)."""
    from xplan.cost_models.compute import RankWork, group_times, grouped_rows, op_time, rank_gemm
    from xplan.cost_models.kernels import gemm_time
    from xplan.cost_models.ops import priced_ops
    from xplan.planner.pricing import Workload, get_trace, price

    profile = load_profile("h100")
    trace = get_trace("qwen3-30b-a3b", 4096, "chunked")
    grouped, loop = RankWork(1.0, ep=8), RankWork(1.0, ep=8, moe_gemm="loop")
    op = next(o for o in priced_ops(trace) if o.category == "grouped")
    m, n, k, groups, _ = rank_gemm(op, loop)
    assert groups == 128 // 8
    assert op_time(op, loop, profile) == pytest.approx(groups * gemm_time(profile, m, n, k, "bf16", 1))
    assert rank_gemm(op, grouped)[0] == grouped_rows(m)
    assert op_time(op, grouped, profile) == pytest.approx(gemm_time(profile, grouped_rows(m), n, k, "bf16", groups))
    extra = sum(groups - 1 for o in priced_ops(trace) if o.category == "grouped" and o.group == "moe")
    assert group_times(trace, loop, profile)[("moe", "ops")] == group_times(trace, grouped, profile)[("moe", "ops")] + extra
    layout = {"devices": 8, "ep": 8}
    work = Workload("qwen3-30b-a3b", "h100", 4096, 8)
    slow = price(work, layout_from_dict({**layout, "kernels": {"moe_gemm": "loop"}}))
    fast = price(work, layout_from_dict(layout))
    assert slow.time["compute"] > fast.time["compute"] and slow.step_time_s > fast.step_time_s


def test_eager_attention_priced_as_it_materialises_scores():
    """kernels.attention eager (runtime/kernels/attention.py: eager_attention) keeps each layer's
    [batch, heads, seq, seq] probabilities (fp32 + bf16) for backward and computes the whole
    square with unfused GEMMs and a softmax chain; the dry run measures qwen3-8b (8 ranks, seq
    1024, no recompute) at 14.62 GiB of activations against the 14.57 priced (7.84 with sdpa)."""
    from xplan.cost_models.kernels import EAGER_SAVED_BYTES
    from xplan.planner.pricing import Workload, price

    work = Workload("qwen3-8b", "h100", 1024, 16)
    base = {"devices": 8, "recompute": "none"}
    sdpa = price(work, layout_from_dict(base))
    eager = price(work, layout_from_dict({**base, "kernels": {"attention": "eager"}}))
    probs = 36 * 32 * 1024 * 1024 * EAGER_SAVED_BYTES  # layers x heads x seq^2 x bytes
    assert eager.memory.activations - sdpa.memory.activations == pytest.approx(probs, rel=1e-9)
    full = {**base, "recompute": "full"}
    one_layer = (price(work, layout_from_dict({**full, "kernels": {"attention": "eager"}})).memory.activations
                 - price(work, layout_from_dict(full)).memory.activations)
    assert one_layer == pytest.approx(probs / 36, rel=1e-9)  # the layer whose backward recomputes them
    long = Workload("qwen3-8b", "h100", 4096, 16)
    slow = price(long, layout_from_dict({**full, "kernels": {"attention": "eager"}}))
    fast = price(long, layout_from_dict(full))
    assert slow.time["compute"] > 1.2 * fast.time["compute"] and slow.time["recompute"] > fast.time["recompute"]


@pytest.mark.parametrize("kernels", [{}, {"elementwise": "eager"}, {"elementwise": "eager", "norm": "fused"},
                                     {"attention": "eager"}, {"attention": "flash"}, {"loss": "fused"}])
@pytest.mark.parametrize("precision", ["bf16", "fp32", "fp8"])
def test_summed_group_times_equal_the_op_by_op_ones(kernels, precision):
    """The search ranks with memory-bound ops summed per key: the same keys' values up to
    floating-point reassociation."""
    from xplan.cost_models.compute import group_times, group_times_summed
    from xplan.cost_models.estimate import rank_work
    from xplan.layout import Layout
    from xplan.planner.pricing import get_trace

    trace = get_trace("qwen3-30b-a3b", 4096, "chunked")
    layout = Layout(devices=8, ep=2, micro_batch=2, recompute="selective", precision=precision, kernels=kernels)
    work = rank_work(trace, layout, recompute_every_mm=2)
    exact, summed = group_times(trace, work, load_profile("h800")), group_times_summed(trace, work, load_profile("h800"))
    assert exact.keys() >= {k for k, v in summed.items() if v}
    for key, value in exact.items():
        assert summed.get(key, 0.0) == pytest.approx(value, rel=1e-12, abs=1e-15), key
