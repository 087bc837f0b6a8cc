"""The one Layout declaration: knobs reach the CLI, plan files and whatif from it alone; data-parallel
modes mean the same thing everywhere; what the runtime does not execute is refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import xplan.layout as layout_module
from xplan.cli import main
from xplan.errors import InputError
from xplan.layout import layout_from_dict, parse_knob, runtime_refusals
from xplan.plan import load_plan, make_plan, save_plan

TRAINING = {"seq_len": 256, "global_batch": 8}


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def dummy_knob(monkeypatch):
    """A knob declared only here, the way a new knob is added: one field on Layout."""

    class LayoutWithDummy(layout_module.Layout):
        dummy_knob: int = layout_module.knob(3, "A knob only this test declares.", ge=1)

    monkeypatch.setattr(layout_module, "Layout", LayoutWithDummy)
    return LayoutWithDummy


def test_a_declared_knob_reaches_cli_help_plan_files_and_whatif(dummy_knob, capsys, tmp_path, tiny_moe_dir):
    from xplan.cli.whatif_cmd import apply_changes, whatif_keys
    from xplan.planner.pricing import Workload

    for command in ("estimate", "search"):
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and "--dummy-knob" in out and "A knob only this test declares." in " ".join(out.split())

    layout = layout_from_dict({"devices": 2, "dummy_knob": 5})
    assert isinstance(layout, dummy_knob) and layout.dummy_knob == 5
    path = save_plan(make_plan(tiny_moe_dir, "cpu", layout, TRAINING), tmp_path / "plan.yaml")
    assert yaml.safe_load(path.read_text())["layout"]["dummy_knob"] == 5
    assert load_plan(path).layout.dummy_knob == 5

    assert "dummy_knob" in whatif_keys()
    workload = Workload(tiny_moe_dir, "cpu", 256, 8)
    _, changed = apply_changes(workload, layout, {"dummy_knob": "7"})
    assert changed.dummy_knob == 7
    with pytest.raises(InputError, match="dummy-knob"):
        apply_changes(workload, layout, {"dummy_knob": "0"})

    code, out, err = run(["estimate", tiny_moe_dir, "cpu", "--devices", "2", "--seq-len", "64",
                          "--dummy-knob", "4", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["layout"]["dummy_knob"] == 4


@pytest.mark.parametrize(("given", "mode", "fsdp"), [
    ({"devices": 64}, "fsdp", 64),
    ({"devices": 64, "fsdp": 8}, "hsdp", 8),
    ({"devices": 64, "fsdp": 1}, "ddp", 1),
    ({"devices": 64, "dp_mode": "zero1"}, "zero1", 1),
    ({"devices": 64, "dp_mode": "ddp"}, "ddp", 1),
    ({"devices": 64, "tp": 4}, "zero1", 1),  # Megatron's layouts run the distributed optimizer
    ({"devices": 64, "tp": 4, "fsdp": 16}, "fsdp", 16),
    ({"devices": 1}, "fsdp", 1),
])
def test_dp_mode_defaults_follow_the_layout(given, mode, fsdp):
    layout = layout_from_dict(given)
    assert (layout.dp_mode, layout.fsdp) == (mode, fsdp)
    assert layout.zero1 == (mode == "zero1")


@pytest.mark.parametrize(("given", "message"), [
    ({"devices": 64, "dp_mode": "hsdp"}, "hsdp needs the shard-group size"),
    ({"devices": 64, "dp_mode": "fsdp", "fsdp": 8}, "fsdp needs fsdp = 64"),
    ({"devices": 64, "dp_mode": "ddp", "fsdp": 8}, "ddp needs fsdp = 1"),
    ({"devices": 64, "kernels": {"tp_comm": "overlapped"}}, "unknown layout key"),
    ({"devices": 64, "fsdp": "8"}, "layout.fsdp: must be a positive integer"),
    ({"devices": 64, "recompute": True}, "recompute must be one of"),
])
def test_inconsistent_layouts_are_input_errors(given, message):
    with pytest.raises(InputError, match=message):
        layout_from_dict(given)


def test_runtime_refusals_name_each_value_it_does_not_execute():
    priced = layout_from_dict({"devices": 64, "tp": 2, "precision": "fp8", "kernels": {"attention": "flash1"}})
    reasons = " ".join(runtime_refusals(priced, "cuda"))
    for part in ("tp = 2", "kernels.attention = flash1"):
        assert part in reasons
    assert "dp_mode" not in reasons and "precision" not in reasons  # zero1 (the default with tp > 1), fp8 run
    fused = layout_from_dict({"devices": 8})
    assert runtime_refusals(fused, "cuda") == []
    assert runtime_refusals(fused, "cpu") == ["kernels.elementwise = fused runs on cuda, npu only, not cpu"]
    assert runtime_refusals(fused, None) == []
    flash = layout_from_dict({"devices": 8, "kernels": {"attention": "flash", "elementwise": "eager"}})
    assert runtime_refusals(flash, "cuda") == runtime_refusals(flash, "npu") == []
    assert runtime_refusals(flash, "cpu") == ["kernels.attention = flash runs on cuda, npu only, not cpu"]


def test_parse_knob_reads_command_line_strings_and_names_the_flag():
    assert parse_knob("micro_batch", "4") == 4
    assert parse_knob("recompute", "0.5") == 0.5
    assert parse_knob("offload", "params,optimizer") == ("optimizer", "params")
    with pytest.raises(InputError, match="--micro-batch needs an integer"):
        parse_knob("micro_batch", "four")
    with pytest.raises(InputError, match="--moe-gemm"):
        parse_knob("moe_gemm", "cutlass")


def test_run_refuses_a_priced_only_plan_before_spawning(tmp_path, tiny_moe_dir, capsys):
    layout = layout_from_dict({"devices": 2, "tp": 2, "precision": "fp32", "kernels": {"elementwise": "eager"}})
    path = save_plan(make_plan(tiny_moe_dir, "cpu", layout, TRAINING), tmp_path / "tp2.yaml")
    code, _, err = run(["run", str(path), "--steps", "1"], capsys)
    assert code == 2 and "does not execute tensor or pipeline parallelism" in " ".join(err.split())


def test_search_writes_only_what_the_runtime_executes(tmp_path, tiny_moe_dir, capsys):
    """Pinning a price-only value: the fitting layouts are listed, no plan is written (exit 2)."""
    out = tmp_path / "p.yaml"
    code, _, err = run(["search", tiny_moe_dir, "cpu", "--devices", "2", "--seq-len", "64", "--global-batch", "4",
                        "--precision", "fp32", "--tp", "2", "-o", str(out)], capsys)
    assert code == 2 and not out.exists()
    assert "no plan written" in " ".join(err.split())
    code, stdout, err = run(["search", tiny_moe_dir, "cpu", "--devices", "2", "--seq-len", "64", "--global-batch",
                             "4", "--precision", "fp32", "--json", "-o", str(out)], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["plan_file"] and load_plan(out).layout.kernels.elementwise == "eager"
    assert all(plan["runtime_refusals"] == [] for plan in result["plans"])


def test_plan_paths_are_relative_to_the_plan_file(tmp_path, tiny_moe_dir, monkeypatch, capsys):
    """A plan written from one directory runs (and prices) from any other."""
    monkeypatch.chdir(tmp_path)
    layout = layout_from_dict({"devices": 1, "precision": "fp32", "kernels": {"elementwise": "eager"}})
    path = save_plan(make_plan(tiny_moe_dir, "cpu", layout, TRAINING), tmp_path / "plans" / "p.yaml")
    stored = yaml.safe_load(path.read_text())["model"]
    assert not stored.startswith("/") and stored.startswith("..")
    monkeypatch.chdir("/")
    assert load_plan(path).model == str(Path(tiny_moe_dir).resolve())
    code, _, err = run(["whatif", str(path), "--set", "micro_batch=2", "--json"], capsys)
    assert code == 0, err
