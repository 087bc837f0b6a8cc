"""Devices and ranks: an a3 device (a 910C package) runs two ranks, one per die.

A plan's `devices` counts the profile's devices; `ranks_per_device` (the profile's, stated at the
plan's top level) multiplies them into the ranks every other layout size counts. The runtime
launches that many ranks and refuses a plan whose ranks per device differ from its hardware's; the
dry run runs at that world size and reports each rank's memory against one die's budget.
"""

from __future__ import annotations

import json

import pytest

from tests.trace_configs import TINY
from xplan.errors import InputError
from xplan.layout import knobs, layout_from_dict
from xplan.plan import load_plan, make_plan, plan_from_dict, save_plan

TRAINING = {"seq_len": 32, "global_batch": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-moe")
    (path / "config.json").write_text(json.dumps(TINY["qwen3_moe"]))
    return path


def test_sizes_count_ranks():
    layout = layout_from_dict({"devices": 8, "ranks_per_device": 2, "ep": 4})
    assert (layout.ranks, layout.dp_world, layout.fsdp, layout.expert_fsdp) == (16, 16, 16, 4)
    assert layout.grad_accum(64) == 4  # 16 data-parallel ranks × micro-batch 1
    assert layout.to_dict()["ranks"] == 16
    assert layout_from_dict({"devices": 8}).ranks == 8
    # A hardware fact, not a layout choice: no CLI flag, no whatif key, no knob-table row.
    assert "ranks_per_device" not in {info.name for info in knobs()}
    with pytest.raises(InputError, match=r"dp_mode fsdp needs fsdp = 16"):
        layout_from_dict({"devices": 8, "ranks_per_device": 2, "dp_mode": "fsdp", "fsdp": 8})


def test_plan_states_ranks_per_device_at_the_top(model_dir, tmp_path):
    layout = layout_from_dict({"devices": 4, "ranks_per_device": 2, "ep": 2})
    path = save_plan(make_plan(str(model_dir), "a3", layout, TRAINING), tmp_path / "a3.yaml")
    text = path.read_text()
    assert "\ndevices: 4\nranks_per_device: 2\n" in text
    loaded = load_plan(path)
    assert loaded.layout == layout and loaded.layout.ranks == 8
    data = loaded.to_dict()
    data["layout"]["ranks_per_device"] = 2
    with pytest.raises(InputError, match="top level"):
        plan_from_dict(data)
    data = make_plan(str(model_dir), "h100", layout_from_dict({"devices": 4}), TRAINING).to_dict()
    del data["ranks_per_device"]
    assert plan_from_dict(data).layout.ranks_per_device == 1  # older plans: one rank per device


def test_run_refuses_a_plan_with_other_ranks_per_device(model_dir):
    from xplan.runtime.train.loop import check_plan_for_runtime

    one = make_plan(str(model_dir), "a3", layout_from_dict({"devices": 4, "ep": 2}), TRAINING)
    with pytest.raises(InputError, match=r"'a3' runs 2 rank\(s\) per device .* `ranks_per_device: 2`"):
        check_plan_for_runtime(one)
    two = make_plan(str(model_dir), "a3", layout_from_dict({"devices": 4, "ranks_per_device": 2, "ep": 2}), TRAINING)
    check_plan_for_runtime(two)
    with pytest.raises(InputError, match=r"runs 1 rank\(s\) per device"):  # a GPU plan cannot claim two
        check_plan_for_runtime(make_plan(str(model_dir), "h100", two.layout, TRAINING))


def test_dry_run_world_is_two_ranks_per_device_against_a_die(model_dir):
    from xplan.runtime.dryrun import dry_run

    plan = make_plan(str(model_dir), "a3", layout_from_dict({"devices": 4, "ranks_per_device": 2, "ep": 2}),
                     TRAINING)
    report = dry_run(plan).to_dict()
    assert (report["world_size"], report["devices"], report["ranks_per_device"]) == (8, 4, 2)
    assert report["rank_memory_budget_gib"] == pytest.approx(64.0)  # 128 GiB per package, two dies
    assert report["measured_over_budget"] == pytest.approx(report["measured_peak_gib"] / 64.0)


def test_a3_prices_each_rank_as_one_die():
    """An a3 layout's sizes count ranks, and each rank is priced on one die: half the package's
    FLOPs, memory, bandwidths; level sizes in ranks. Tokens/s stay per device (both dies)."""
    from xplan.cost_models import estimate
    from xplan.hw_profiles import load_profile
    from xplan.planner.pricing import Workload, get_trace, load_model_config, price

    a3 = load_profile("a3")
    die = a3.per_rank()
    assert die is a3.per_rank() and die.device.ranks_per_device == 1
    assert (die.memory.hbm_gib, die.compute.peak_tflops.bf16, die.memory.hbm_tbps) == (64, 376, 1.6)
    assert [lv.devices for lv in die.levels] == [16, 768, None]
    assert die.levels[0].bandwidth_gbps == 196 and die.host.link_gbps == 40
    h100 = load_profile("h100")
    assert h100.per_rank() is h100

    layout = layout_from_dict({"devices": 16, "ranks_per_device": 2, "ep": 16})
    est = price(Workload("qwen3-30b-a3b", "a3", 4096, 32), layout)
    assert est.hbm_bytes == 64 * 2**30  # the budget each rank (die) has
    # the same 32 ranks priced as 32 devices of the per-die profile: the same step and memory
    flat = estimate(get_trace("qwen3-30b-a3b", 4096, "chunked"), load_model_config("qwen3-30b-a3b"),
                    layout_from_dict({"devices": 32, "ep": 16}), die, 32)
    assert est.step_time_s == pytest.approx(flat.step_time_s, rel=1e-12)
    assert est.memory.total == pytest.approx(flat.memory.total, rel=1e-12)
    assert est.tokens_per_s_per_device == pytest.approx(2 * flat.tokens_per_s_per_device, rel=1e-12)
    assert est.mfu == pytest.approx(flat.mfu, rel=1e-12)  # per device against the package's peak


def test_search_on_a3_writes_a_plan_run_accepts(tmp_path, capsys):
    from xplan.cli import main
    from xplan.runtime.train.loop import check_plan_for_runtime

    path = tmp_path / "a3.yaml"
    assert main(["search", "qwen3-30b-a3b", "a3", "--devices", "16", "-o", str(path)]) == 0, capsys.readouterr().err
    plan = load_plan(path)
    assert (plan.layout.devices, plan.layout.ranks_per_device, plan.training.global_batch) == (16, 2, 32)
    check_plan_for_runtime(plan, "npu")
    assert "per rank (one die)" in capsys.readouterr().out


def test_whatif_on_an_a3_plan_keeps_its_ranks(model_dir, tmp_path, capsys):
    from xplan.cli import main

    layout = layout_from_dict({"devices": 4, "ranks_per_device": 2, "ep": 2})
    path = save_plan(make_plan(str(model_dir), "a3", layout, TRAINING), tmp_path / "a3.yaml")
    assert main(["whatif", str(path), "--set", "ep=4", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    after = result["after"]["layout"]
    assert (after["ranks_per_device"], after["ranks"], after["fsdp"], after["ep"]) == (2, 8, 8, 4)
    assert result["after"]["memory_gib"]["capacity"] == pytest.approx(64.0)  # one die's
    assert main(["whatif", str(path), "--set", "hw=h100", "--json"]) == 0, capsys.readouterr().err
    after = json.loads(capsys.readouterr().out)["after"]["layout"]
    assert (after["ranks_per_device"], after["ranks"], after["fsdp"]) == (1, 4, 4)


def test_estimate_on_a3_counts_ranks(capsys):
    from xplan.cli import main

    assert main(["estimate", "qwen3-30b-a3b", "a3", "--devices", "16", "--ep", "16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["layout"]["ranks"], d["layout"]["fsdp"], d["global_batch"]) == (32, 32, 32)
    assert d["memory_gib"]["capacity"] == pytest.approx(64.0)
