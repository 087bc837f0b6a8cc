"""Checkpoint directories are data: state files carry no code, every file is checked against the
manifest, and a damaged newest checkpoint falls back to the previous one that verifies."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

from xplan.errors import InputError
from xplan.runtime.train import manifest
from xplan.runtime.train.checkpoint import step_dir


def fake_checkpoint(root, step, model="m", payload=b"weights" * 100):
    """A checkpoint directory the way save_checkpoint leaves it: files, then the manifest."""
    directory = step_dir(root, step)
    directory.mkdir(parents=True)
    (directory / "__0_0.distcp").write_bytes(payload)
    (directory / ".metadata").write_bytes(b"meta" * 10)
    manifest.write_json(directory / manifest.TRAINER_FILE, {"step": step, "world_size": 1, "scheduler": {}})
    files = {p.name: manifest.file_digest(p) for p in directory.iterdir()}
    manifest.write_manifest(directory, step, 1, model, {"optimizer": {"lr": 3e-4}}, files)
    return directory


def _random_bytes(path):
    data = bytearray(path.read_bytes())
    data[10:20] = os.urandom(10)
    path.write_bytes(bytes(data))


DAMAGE = {
    "random bytes inside a shard": lambda d: _random_bytes(d / "__0_0.distcp"),
    "truncated shard": lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:50]),
    "deleted shard": lambda d: (d / "__0_0.distcp").unlink(),
    "truncated .metadata": lambda d: (d / ".metadata").write_bytes(b"me"),
    "garbage trainer state": lambda d: (d / manifest.TRAINER_FILE).write_bytes(b"\xff\xfe{{{"),
    "garbage manifest": lambda d: (d / manifest.MANIFEST).write_bytes(b"[" * 100000),
    "missing manifest": lambda d: (d / manifest.MANIFEST).unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    older = fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    assert manifest.verify(newest)[1] is None
    DAMAGE[damage](newest)
    _, problem = manifest.verify(newest)
    assert problem is not None
    step, path, _, notes = manifest.select_checkpoint(tmp_path, "m")
    assert (step, path) == (10, older)
    assert len(notes) == 1 and notes[0].startswith("skipped step_00000020: ")


def test_no_intact_checkpoint_is_an_input_error_naming_each(tmp_path):
    DAMAGE["deleted shard"](fake_checkpoint(tmp_path, 10))
    with pytest.raises(InputError, match=r"step_00000010: __0_0.distcp is missing"):
        manifest.select_checkpoint(tmp_path)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 10, model="other")
    with pytest.raises(InputError, match="different model"):
        manifest.select_checkpoint(tmp_path, "mine")


def test_a_pickled_state_file_is_never_loaded(tmp_path):
    """An older-format checkpoint whose trainer.pt would run code when unpickled is skipped."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    directory = step_dir(tmp_path / "ckpt", 10)
    directory.mkdir(parents=True)
    (directory / "trainer.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="older xplan that pickled its state"):
        manifest.select_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


def test_rng_state_round_trips_as_data(tmp_path):
    import numpy as np

    random.seed(3)
    torch.manual_seed(4)
    np.random.seed(5)
    manifest.save_rng(tmp_path / "rng.safetensors", "cpu")
    expected = (random.random(), torch.rand(3), np.random.rand(2))
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    manifest.load_rng(tmp_path / "rng.safetensors", "cpu")
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    assert (np.random.rand(2) == expected[2]).all()


def test_training_differences_report_each_changed_setting():
    saved = {"steps": 10, "optimizer": {"lr": 3e-4, "betas": [0.9, 0.95]}, "schedule": {"kind": "cosine"}}
    now = {"steps": 20, "optimizer": {"lr": 1e-4, "betas": (0.9, 0.95)}, "schedule": {"kind": "cosine"}}
    assert manifest.training_differences(saved, now) == ["optimizer.lr: checkpoint 0.0003, plan 0.0001"]
