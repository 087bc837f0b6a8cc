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
