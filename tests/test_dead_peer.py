"""A rank that stops or dies mid-run (issue 15): the surviving rank fails within the collective
timeout with a message that names the problem and the rank that fell behind, not a traceback (CPU,
gloo, `xplan run` spawning two ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_run_cli import model_dir, write_plan  # noqa: F401 - model_dir is a fixture

TIMEOUT_S = 5


def _workers(parent: int) -> list[int]:
    """The spawned ranks of `parent`, in rank order (spawned one after another, rank 0 first)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _finished_steps(metrics: Path) -> int:
    try:
        return len([line for line in metrics.read_text().splitlines() if line.strip()])
    except OSError:
        return 0


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_dead_or_stopped_peer_is_named_within_the_timeout(tmp_path, model_dir, how):  # noqa: F811
    plan = write_plan(tmp_path / "plan.yaml", model_dir, devices=2, fsdp=2, training={"steps": 1000})
    metrics = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-c", "from xplan.cli import entry; entry()", "run", str(plan), "--steps", "1000",
           "--metrics", str(metrics), "--timeout", str(TIMEOUT_S)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    victim = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and job.poll() is None and _finished_steps(metrics) < 2:
            time.sleep(0.05)
        ranks = _workers(job.pid)
        assert len(ranks) == 2 and job.poll() is None, "the run did not start two ranks"
        victim = ranks[1]
        stopped_at = time.time()
        os.kill(victim, signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
        _, err = job.communicate(timeout=60 + TIMEOUT_S)
        took = time.time() - stopped_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = " ".join(err.decode().split())
    assert job.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert took < TIMEOUT_S + 30, f"the survivor took {took:.0f} s"
    if how == "stopped":
        assert f"rank 0 of 2: a collective timed out after {TIMEOUT_S} s" in text, text[-3000:]
        assert "The other rank, rank 1, finished step" in text, text[-3000:]
    else:  # the launcher sees the dead process before the survivor's collective fails
        assert "process 1 terminated with signal SIGKILL" in text or "rank 0 of 2" in text, text[-3000:]
