"""Under `torchrun --max-restarts 1`, a rank killed mid-run brings the job back from its last
checkpoint, and the finished run's losses equal an uninterrupted run's (CPU, gloo). One restart
must do: a restarted attempt keys its process groups apart from the dead attempt's
(runtime/distributed/device.py), which a shared rendezvous store otherwise mixes up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_run_cli import model_dir, run_json, write_plan  # noqa: F401 - model_dir is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, EVERY, KILL_AFTER = 40, 5, 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _rank_process(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


def _steps(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_a_killed_rank_restarts_from_the_last_checkpoint(tmp_path, model_dir):  # noqa: F811
    plan = write_plan(tmp_path / "plan.yaml", model_dir, devices=2, fsdp=2, training={"steps": STEPS})
    uninterrupted = run_json(plan, "--steps", STEPS, "--checkpoint-dir", tmp_path / "base")["losses"]

    ckpt = tmp_path / "ckpt"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    xplan = str(Path(sys.executable).with_name("xplan"))
    cmd = [torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", xplan, "run", str(plan), "--steps", str(STEPS),
           "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY), "--device", "cpu", "--json",
           "--timeout", "60"]  # a stuck collective of a restarted mesh fails well within the wait below
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        killed = False
        while time.time() < deadline and job.poll() is None:
            done = [r["step"] for r in _steps(ckpt / "metrics.jsonl")]
            if done and max(done) >= KILL_AFTER:
                pid = _rank_process(job.pid, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.05)
        assert killed, "the run finished (or never started) before a rank could be killed"
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, err.decode()[-3000:]
    # The first attempt's rank 0 may report its broken collective before torchrun stops it: the
    # finished run's summary is the last JSON object on stdout.
    decoder, text, objects, at = json.JSONDecoder(), out.decode(), [], 0
    while (start := text.find("{", at)) >= 0:
        obj, at = decoder.raw_decode(text, start)
        objects.append(obj)
    summary = objects[-1]
    assert summary["resumed_from"] and summary["start_step"] >= EVERY  # the restart continued the run
    records = _steps(ckpt / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == uninterrupted  # bit-exact with the run nobody killed
