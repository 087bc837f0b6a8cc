"""`xplan run`: training end to end on CPU (gloo, fp32, deterministic).

Covers the acceptance of the runtime issue: loss goes down on a tiny Qwen3-MoE, `--json` fields,
the Hugging Face export loads in transformers with identical logits, exact resume, world size 2
(FSDP 2 × EP 2, spawned by `xplan run` itself) matching world size 1, and exit code 2 with a
clear message for bad input.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from tests.parity_utils import max_rel_err
from xplan.cli import main
from xplan.layout import Layout
from xplan.plan import make_plan, save_plan

TINY_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}
TRAINING = {"seq_len": 32, "global_batch": 4, "steps": 20, "seed": 0, "optimizer": {"lr": 3e-3},
            "schedule": {"kind": "cosine", "warmup_steps": 2}}
JSON_FIELDS = ("losses", "step_time_s", "tokens_per_s_per_device", "peak_memory_gib", "predicted_peak_gib",
               "predicted_step_time_s")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    (path / "config.json").write_text(json.dumps(TINY_MOE))
    return path


def write_plan(path, model_dir, devices=1, fsdp=None, ep=1, training=None, predictions=None, **layout):
    layout.setdefault("kernels", {"elementwise": "eager"})  # the CPU runtime runs elementwise ops eagerly
    lay = Layout(devices=devices, fsdp=fsdp or devices, ep=ep, precision="fp32", **layout)
    plan = make_plan(str(model_dir), "cpu", lay, {**TRAINING, **(training or {})}, predictions=predictions)
    return save_plan(plan, path)


def xplan(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_json(*args: str) -> dict:
    code, out, err = xplan("run", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, model_dir):
    """20 uninterrupted steps at world size 1, with checkpoints and the HF export."""
    root = tmp_path_factory.mktemp("baseline")
    plan = write_plan(root / "plan.yaml", model_dir,
                      predictions={"memory_gib": {"total": 0.5, "params": 0.01}, "step_time_s": 0.05})
    summary = run_json(plan, "--steps", 20, "--checkpoint-dir", root / "ckpt")
    return summary, root


def test_run_trains_and_reports(baseline):
    summary, root = baseline
    for field in JSON_FIELDS:
        assert field in summary
    losses = summary["losses"]
    assert len(losses) == 20 and all(isinstance(x, float) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2  # the loss goes down
    assert summary["step_time_s"] > 0 and summary["tokens_per_s_per_device"] > 0
    assert summary["peak_memory_gib"] > 0 and summary["peak_memory_kind"] == "rss_peak"
    assert summary["predicted_peak_gib"] == 0.5 and summary["predicted_step_time_s"] == 0.05
    assert summary["peak_memory_ratio"] == pytest.approx(summary["peak_memory_gib"] / 0.5)
    records = [json.loads(line) for line in (root / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert [r["loss"] for r in records] == losses
    assert {"grad_norm", "lr", "tokens_per_s_per_device", "peak_memory_gib", "step_time_ratio"} <= set(records[0])
    assert summary["checkpoint"].endswith("step_00000020")
    assert summary["kernels_executed"] == {"attention": "sdpa", "moe_gemm": "grouped_mm", "permute": "torch",
                                           "loss": "chunked", "norm": "torch_rmsnorm", "elementwise": "eager"}


def test_hf_export_loads_in_transformers(baseline, model_dir):
    import transformers

    import xplan.runtime as xr

    export = baseline[1] / "ckpt" / "hf"
    ref = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ours = xr.load_model(export)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_rel_err(ours(ids), ref(ids).logits) <= 1e-5
        untrained = xr.load_model(model_dir, seed=0)(ids)
        assert max_rel_err(untrained, ours(ids)) > 1e-2  # the export holds the trained weights


def test_resume_is_exact(baseline, model_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", model_dir)
    ckpt = tmp_path / "ckpt"
    first = run_json(plan, "--steps", 10, "--checkpoint-dir", ckpt, "--checkpoint-every", 10)
    assert (ckpt / "step_00000010").is_dir()
    second = run_json(plan, "--steps", 20, "--checkpoint-dir", ckpt, "--resume")
    assert second["start_step"] == 10 and len(second["losses"]) == 10
    assert first["losses"] + second["losses"] == baseline[0]["losses"]  # bit-exact
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 21))  # appended on resume


def test_world_size_2_fsdp_ep_matches_world_size_1(baseline, model_dir, tmp_path):
    """Spawned by `xplan run` (2 gloo processes): FSDP 2 with the experts split over EP 2."""
    import xplan.runtime as xr

    plan = write_plan(tmp_path / "plan.yaml", model_dir, devices=2, fsdp=2, ep=2)
    summary = run_json(plan, "--steps", 20, "--checkpoint-dir", tmp_path / "ckpt")
    assert summary["world_size"] == 2
    # The busiest EP rank's routed load over the mean, measured every step (what --imbalance prices).
    assert summary["ep_imbalance"] is not None and 1.0 <= summary["ep_imbalance"] <= 2.0
    ref = baseline[0]["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], ref, strict=True)) <= 1e-5
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the export gathers the sharded experts into the same model
        assert max_rel_err(xr.load_model(tmp_path / "ckpt" / "hf")(ids),
                           xr.load_model(baseline[1] / "ckpt" / "hf")(ids)) <= 1e-4


def test_a3_plan_runs_two_ranks_per_device_with_zero1(baseline, model_dir, tmp_path):
    """An a3 plan for 1 device (a 910C package) runs 2 ranks, one per die (gloo here, --device cpu):
    ZeRO-1 with the experts split over EP 2; losses and the export match world size 1."""
    import xplan.runtime as xr

    lay = Layout(devices=1, ranks_per_device=2, dp_mode="zero1", ep=2, precision="fp32",
                 kernels={"elementwise": "eager"})
    plan = save_plan(make_plan(str(model_dir), "a3", lay, TRAINING), tmp_path / "a3.yaml")
    summary = run_json(plan, "--steps", 20, "--device", "cpu", "--checkpoint-dir", tmp_path / "ckpt")
    assert (summary["world_size"], summary["devices"]) == (2, 1)
    ref = baseline[0]["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], ref, strict=True)) <= 1e-5
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the export gathers ZeRO-1's fp32 shards
        assert max_rel_err(xr.load_model(tmp_path / "ckpt" / "hf")(ids),
                           xr.load_model(baseline[1] / "ckpt" / "hf")(ids)) <= 1e-4


# ---------------------------------------------------------------- bad input: exit 2, clear message


def assert_exit_2(args, message):
    code, out, err = xplan("run", *args)
    assert code == 2, (code, out, err)
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_malformed_plan(tmp_path):
    bad = tmp_path / "plan.yaml"
    bad.write_text("xplan_plan: 1\nmodel: x\n")
    assert_exit_2([bad], "is not a valid plan")
    bad.write_text("{unclosed")
    assert_exit_2([bad], "not valid YAML")
    assert_exit_2([tmp_path / "missing.yaml"], "cannot read plan file")


def test_world_mismatch_under_torchrun(model_dir, tmp_path, monkeypatch):
    plan = write_plan(tmp_path / "plan.yaml", model_dir, devices=1)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(key, value)
    assert_exit_2([plan], "the plan runs on 1 rank but torchrun started WORLD_SIZE=2")


def test_missing_data_file(model_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", model_dir,
                      training={"data": {"kind": "jsonl", "path": str(tmp_path / "nope.jsonl")}})
    assert_exit_2([plan], "nope.jsonl does not exist")


@pytest.mark.parametrize("layout, message", [
    ({"devices": 3, "ep": 3}, "ep (3) must divide the number of routed experts (8)"),
    ({"devices": 2, "tp": 2, "fsdp": 1}, "does not execute tensor or pipeline parallelism"),
    ({"devices": 8, "sp": 8}, "Ulysses sp (8) must divide the attention heads (4)"),
])
def test_unsupported_layout(model_dir, tmp_path, layout, message):
    plan = write_plan(tmp_path / "plan.yaml", model_dir, **layout)
    assert_exit_2([plan], message)


def test_resume_without_checkpoint(model_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", model_dir)
    assert_exit_2([plan, "--resume", "--checkpoint-dir", tmp_path / "empty"], "no complete checkpoint")
    assert_exit_2([plan, "--resume"], "--resume needs --checkpoint-dir")


def test_failing_worker_brings_the_launch_down(model_dir, tmp_path):
    """An error inside spawned workers (found only when they load the data) ends the run with the
    worker's message and exit 2 instead of hanging the other rank."""
    data = tmp_path / "tokens.jsonl"
    data.write_text(json.dumps(list(range(100)) + [500]) + "\n")
    plan = write_plan(tmp_path / "plan.yaml", model_dir, devices=2,
                      training={"data": {"kind": "jsonl", "path": str(data)}})
    assert_exit_2([plan, "--steps", 2], "outside the model's vocabulary")


def test_checkpoint_every_needs_a_directory(model_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", model_dir)
    assert_exit_2([plan, "--checkpoint-every", 5], "--checkpoint-every needs --checkpoint-dir")


def test_tables_and_local_jsonl_data(model_dir, tmp_path):
    """Human output (per-step lines when not a terminal, then a summary table); jsonl data found
    relative to the plan's directory."""
    gen = torch.Generator().manual_seed(0)
    lines = [json.dumps(torch.randint(0, 128, (50,), generator=gen).tolist()) for _ in range(6)]
    (tmp_path / "tokens.jsonl").write_text("\n".join(lines) + "\n")
    plan = write_plan(tmp_path / "plan.yaml", model_dir, training={"data": {"kind": "jsonl", "path": "tokens.jsonl"}})
    code, out, err = xplan("run", plan, "--steps", 2)
    assert code == 0, err
    assert "step      2  loss" in out and "run summary" in out and "tokens.jsonl (300 tokens" in out
    assert len((tmp_path / "plan.metrics.jsonl").read_text().splitlines()) == 2
