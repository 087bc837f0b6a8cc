"""Offload, resharding and the allocator in the cost model (`cost_models/offload.py`), the search
and the lever report; the runtime side is `tests/test_offload.py`, the dry run's agreement at full
scale is the last two tests (issue #16's layouts)."""

from __future__ import annotations

import pytest

from xplan.cost_models import estimate, host_capacity, memory_estimate
from xplan.cost_models.offload import OffloadedLayer, exposed_copy_time
from xplan.hw_profiles import load_profile
from xplan.layout import Layout
from xplan.planner.pricing import Workload, get_trace, load_model_config

GIB = 2**30
QWEN = "qwen3-235b-a22b"
XTUNER = dict(devices=256, fsdp=256, ep=1, micro_batch=16, recompute="full")  # XTuner V1's 2000 tok/s run


def _price(layout: Layout, seq_len=4096, global_batch=4096, model=QWEN, hardware="h800"):
    trace = get_trace(model, seq_len, layout.kernels.get("loss", "chunked"))
    return estimate(trace, load_model_config(model), layout, load_profile(hardware), global_batch), trace


def test_copy_timeline_hides_what_fits_under_compute_and_exposes_the_rest():
    small = [OffloadedLayer("moe", "full", 1.0, 1.0)] * 3 + [OffloadedLayer("moe", "full", 1.0, 0.0)]
    assert exposed_copy_time(small, [1.0] * 4, [2.0] * 4, bandwidth=10.0) == (0.0, 0.0)
    big = [OffloadedLayer("moe", "none", 10.0, 10.0), OffloadedLayer("moe", "none", 10.0, 0.0)]
    # Forward: layer 0's copy (10 s) ends after layer 1's forward (2 s): 8 s exposed. Backward:
    # layer 1 (1 s) starts layer 0's copy back (10 s), which layer 0 waits for: 9 s exposed.
    assert exposed_copy_time(big, [1.0, 1.0], [1.0, 1.0], bandwidth=1.0) == (8.0, 9.0)


def test_activation_offload_moves_every_layer_input_but_the_last():
    base, _ = _price(Layout(**XTUNER))
    off, trace = _price(Layout(**XTUNER, offload=("activations",)))
    layer_input = 16 * 4096 * 4096 * 2  # micro-batch 16 x 4096 tokens x hidden 4096, bf16
    layers = len(trace.layer_kinds)
    assert off.memory.host_activations == pytest.approx((layers - 1) * layer_input)
    assert off.memory.offloaded_to_host == off.memory.host_activations
    # On the device: the running layer's input and the one prefetched (and the embedding's).
    assert off.memory.activations == pytest.approx(2 * layer_input, rel=0.05)
    assert base.memory.activations > 40 * GIB and not base.fits and off.fits
    assert off.time["offload"] == 0.0  # 0.5 GiB per layer crosses the link well under a layer's compute
    assert off.memory.total < 80 * GIB and off.tokens_per_s_per_device > 2000


def test_optimizer_offload_moves_the_moments_only():
    base, _ = _price(Layout(**XTUNER, offload=("activations",)))
    off, trace = _price(Layout(**XTUNER, offload=("optimizer", "activations")))
    numel = trace.params_total / 256
    assert off.memory.optimizer == 0.0 and off.memory.parameters == base.memory.parameters
    assert off.memory.host_states == pytest.approx(8 * numel)
    assert off.time["optimizer"] - base.time["optimizer"] == pytest.approx(16 * numel / load_profile("h800").host_bandwidth())
    params, _ = _price(Layout(**XTUNER, offload=("params", "activations")))
    assert params.memory.host_states == pytest.approx(16 * numel) and params.memory.parameters == 0.0


def test_keep_gathered_trades_memory_for_all_gathers():
    layout = dict(devices=16, fsdp=16, micro_batch=1, recompute="full")
    base, trace = _price(Layout(**layout), model="qwen3-30b-a3b", global_batch=128)  # grad accum 8
    kept, _ = _price(Layout(**layout, keep_gathered=("moe",)), model="qwen3-30b-a3b", global_batch=128)
    block = trace.blocks["moe"]
    assert kept.memory.gathered_parameters == pytest.approx(block.count * block.params_total * 2)
    assert kept.time["fsdp_copies"] < base.time["fsdp_copies"]
    assert kept.time["fsdp_exposed"] <= base.time["fsdp_exposed"]


def test_host_memory_is_checked_per_node():
    h800 = load_profile("h800")  # 256 GiB per device, 8 devices per node
    assert host_capacity(h800, 256) == 256 * GIB
    assert host_capacity(h800, 2) == 4 * 256 * GIB  # two devices share one node's host memory
    layout = Layout(**XTUNER, offload=("activations",))
    trace = get_trace(QWEN, 4096, "chunked")
    memory = memory_estimate(trace, layout, h800, 1, config=load_model_config(QWEN))
    est, _ = _price(layout)
    node = est.to_dict()["host_per_node_gib"]
    assert node == {"needed": pytest.approx(8 * memory.offloaded_to_host / GIB), "capacity": 2048.0, "ranks": 8}


def test_levers_explain_what_each_setting_saves_and_costs():
    from xplan.planner.levers import explain_levers

    layout = Layout(**XTUNER, offload=("activations",))
    est, _ = _price(layout)
    levers = {lever.name: lever for lever in explain_levers(est, Workload(QWEN, "h800", 4096, 4096))}
    assert set(levers) == {"recompute full", "offload activations"}
    offload = levers["offload activations"]
    assert not offload.fits_without and offload.device_gib > 40 and offload.host_gib == pytest.approx(46.5)
    assert offload.time_s == 0.0 and "needed to fit device memory" in offload.describe()


def test_search_at_64k_without_sequence_parallelism_finds_an_offload_plan():
    from xplan.planner.search import search

    result = search(Workload(QWEN, "h800", 65536, 256), 256, {"sp": 1})
    best = result.best_runnable
    assert best is not None and best.fits and "activations" in best.layout.offload
    assert best.layout.recompute not in ("none", "selective") and best.memory.host_activations > 0
    # Tiling, recompute and offload weighed together: tiling the feed-forward half lets a rank
    # recompute only what the host cannot hold (0.75), but each 8192-token tile pads every
    # expert's grouped GEMM rows (512 a tile here) by half an M tile, and that costs about what
    # the recompute saves: the two fits are within 0.1%, the untiled full recompute just ahead.
    plans = {(p.layout.tile_tokens, p.layout.recompute, p.layout.offload): p for p in result.plans if p.layout.ep == 1}
    tiled = plans[(8192, 0.75, ("activations",))]
    untiled = plans[(None, "full", ("activations",))]
    assert tiled.fits and untiled.fits and tiled.memory.allocated < untiled.memory.allocated
    assert tiled.tokens_per_s_per_device == pytest.approx(untiled.tokens_per_s_per_device, rel=1e-3)
    assert best.tokens_per_s_per_device == max(p.tokens_per_s_per_device for p in result.plans)


def _dry_run(layout: Layout, seq_len: int, global_batch: int):
    from xplan.app.dryrun_compare import compare_dry_run
    from xplan.plan import make_plan

    plan = make_plan(QWEN, "h800", layout, {"seq_len": seq_len, "global_batch": global_batch})
    return compare_dry_run(plan, layers=3, reprice=True)


@pytest.mark.parametrize(("layout", "seq_len", "global_batch"), [
    # issue #16: the 64k plan `xplan search ... --sp 1` writes, and XTuner V1's 2000 tok/s layout.
    (Layout(devices=256, fsdp=256, ep=1, micro_batch=1, recompute="full", offload=("activations",)), 65536, 256),
    (Layout(devices=256, fsdp=256, ep=1, micro_batch=1, recompute=0.75, offload=("activations",), tile_tokens=8192),
     65536, 256),
    (Layout(**XTUNER, offload=("optimizer", "activations")), 4096, 4096),
])
def test_dry_run_agrees_with_the_device_and_host_prediction(layout, seq_len, global_batch):
    result = _dry_run(layout, seq_len, global_batch)
    assert abs(result.error) <= 0.03, result.to_dict()["components"]
    assert result.host_ratio == pytest.approx(1.0, abs=0.03)
    assert result.measured_host_bytes > 40 * GIB
