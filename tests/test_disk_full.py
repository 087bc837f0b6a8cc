"""A disk that fills up while a checkpoint is saved (issue 15): the run stops saying the disk is
full and naming the path, the partial save is removed, the previous checkpoint still verifies and
resumes to the losses of an uninterrupted run. One process (world size 1) runs in this process, so
the file writers can be made to fail here."""

from __future__ import annotations

import errno
import os

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs

from tests.test_run_cli import model_dir, run_json, write_plan, xplan  # noqa: F401 - model_dir is a fixture
from xplan.runtime.train import manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def _full(path="checkpoint file"):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _dcp_shard_fails(monkeypatch):
    """DCP's shard writer writes part of an item, then the disk is full."""
    original = dcp_fs._write_item

    def write_item(transforms, stream, data, write_item, storage_key, *args, **kwargs):
        stream.write(b"partial")
        raise _full(getattr(stream, "name", storage_key))

    monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    return original


def _rng_file_fails(monkeypatch):
    """The shards are written; this rank's RNG file is cut short by a full disk."""
    def save_rng(path, device_type):
        path.write_bytes(b"\x00" * 10)
        raise _full(path)

    monkeypatch.setattr(manifest, "save_rng", save_rng)


def _manifest_fails(monkeypatch):
    """Everything is written but the manifest, the last file."""
    def write_manifest(directory, *args, **kwargs):
        (directory / manifest.MANIFEST).write_bytes(b"{")
        raise _full(directory / manifest.MANIFEST)

    monkeypatch.setattr(manifest, "write_manifest", write_manifest)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("full")
    plan = write_plan(root / "plan.yaml", model_dir)
    return plan, run_json(plan, "--steps", 4)["losses"]


@pytest.mark.parametrize("failure", [_dcp_shard_fails, _rng_file_fails, _manifest_fails])
def test_a_full_disk_keeps_the_last_checkpoint(uninterrupted, tmp_path, monkeypatch, failure):
    plan, losses = uninterrupted
    ckpt = tmp_path / "ckpt"
    run_json(plan, "--steps", 2, "--checkpoint-dir", ckpt, "--checkpoint-every", 2)
    good = ckpt / "step_00000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    with monkeypatch.context() as patch:
        failure(patch)
        code, _, err = xplan("run", plan, "--steps", 4, "--checkpoint-dir", ckpt, "--checkpoint-every", 2,
                             "--resume")
    text = " ".join(err.split())
    assert code == 1 and "the disk is full" in text and str(ckpt) in text and "Traceback" not in err, err
    assert not list(ckpt.glob(".tmp-*")), "the partial save holds the space"
    assert not (ckpt / "step_00000004").exists()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert manifest.verify(good)[1] is None

    summary = run_json(plan, "--steps", 4, "--checkpoint-dir", ckpt, "--resume")
    assert summary["resumed_from"].endswith("step_00000002")
    assert summary["losses"] == losses[2:]
