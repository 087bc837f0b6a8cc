"""`xplan run` when things go wrong (CPU, gloo): a damaged newest checkpoint is skipped and the run
resumes from the previous one with the losses of an uninterrupted run; non-finite losses stop the
run before anything is saved; runs never mix in one checkpoint directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from tests.test_checkpoint_manifest import DAMAGE
from tests.test_run_cli import model_dir, run_json, write_plan, xplan  # noqa: F401 - model_dir is a fixture
from xplan.runtime.train import manifest

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6


@pytest.fixture(scope="module")
def history(tmp_path_factory, model_dir):  # noqa: F811
    """An uninterrupted run of STEPS steps, checkpoints every 2 (steps 2, 4, 6)."""
    root = tmp_path_factory.mktemp("history")
    plan = write_plan(root / "plan.yaml", model_dir)
    summary = run_json(plan, "--steps", STEPS, "--checkpoint-dir", root / "ckpt", "--checkpoint-every", 2)
    return plan, root / "ckpt", summary["losses"]


@pytest.mark.parametrize("damage", ["random bytes inside a shard", "truncated shard", "deleted shard",
                                    "truncated .metadata", "garbage trainer state"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous(history, tmp_path, damage):
    plan, ckpt, losses = history
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    newest = copy / "step_00000006"
    assert (newest / "__0_0.distcp").is_file()  # the shard DAMAGE edits
    DAMAGE[damage](newest)
    summary = run_json(plan, "--steps", STEPS, "--checkpoint-dir", copy, "--resume")
    assert summary["resumed_from"].endswith("step_00000004")
    assert summary["skipped_checkpoints"] and "step_00000006" in summary["skipped_checkpoints"][0]
    assert summary["losses"] == losses[4:]  # bit-exact with the uninterrupted run
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the steps after the checkpoint are logged once
    assert manifest.verify(copy / "step_00000006")[1] is None  # the damaged one was replaced


def _tree_digest(path):
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_state(history, tmp_path, model_dir):  # noqa: F811
    plan, ckpt, _ = history
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    hf_before = _tree_digest(copy / "hf")
    exploding = write_plan(tmp_path / "explode.yaml", model_dir, training={"optimizer": {"lr": 1e30}})
    code, _, err = xplan("run", exploding, "--steps", 12, "--checkpoint-dir", copy, "--checkpoint-every", 1,
                         "--resume", "--accept-plan-changes")
    text = " ".join(err.split())
    assert code == 1 and "non-finite loss" in text and "step " in text
    assert _tree_digest(copy / "hf") == hf_before
    for step_dir in copy.glob("step_*"):
        assert manifest.verify(step_dir)[1] is None
    saved = sorted(int(p.name[5:]) for p in copy.glob("step_*"))
    failed_at = int(text.split("step ")[1].split(":")[0])
    assert max(saved) < failed_at


def test_plan_changes_on_resume_need_consent(history, tmp_path, model_dir):  # noqa: F811
    _, ckpt, _ = history
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    changed = write_plan(tmp_path / "changed.yaml", model_dir, training={"optimizer": {"lr": 1e-3}})
    code, _, err = xplan("run", changed, "--steps", STEPS + 1, "--checkpoint-dir", copy, "--resume")
    assert code == 2 and "optimizer.lr: checkpoint 0.003, plan 0.001" in " ".join(err.split())
    summary = run_json(changed, "--steps", STEPS + 1, "--checkpoint-dir", copy, "--resume", "--accept-plan-changes")
    assert summary["plan_changes"] == ["optimizer.lr: checkpoint 0.003, plan 0.001"]


def test_a_fresh_run_does_not_mix_into_another_runs_directory(history, tmp_path):
    plan, ckpt, losses = history
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    code, _, err = xplan("run", plan, "--steps", 2, "--checkpoint-dir", copy)
    assert code == 2 and "--overwrite" in " ".join(err.split())
    summary = run_json(plan, "--steps", 2, "--checkpoint-dir", copy, "--overwrite")
    assert summary["losses"] == losses[:2]
    assert sorted(p.name for p in copy.glob("step_*")) == ["step_00000002"]


def test_a_checkpoint_of_another_model_is_refused(history, tmp_path, model_dir):  # noqa: F811
    _, ckpt, _ = history
    other = tmp_path / "wider"
    other.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    plan = write_plan(tmp_path / "plan.yaml", other)
    code, _, err = xplan("run", plan, "--steps", STEPS + 1, "--checkpoint-dir", ckpt, "--resume")
    assert code == 2 and "different model" in " ".join(err.split())
    assert os.path.isdir(ckpt / "step_00000006")


def test_a_plan_too_wide_for_this_machine_is_refused_before_spawning(tmp_path, model_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    plan = write_plan(tmp_path / "wide.yaml", model_dir, devices=64, fsdp=64, training={"global_batch": 64})
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and "64 ranks on this machine's 2 CPU cores" in " ".join(err.split())
