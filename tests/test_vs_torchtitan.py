"""benchmarks/vs_torchtitan.py --smoke: the CPU run of the xplan-vs-torchtitan-style comparison (CI keeps the
GPU script from rotting): both sides train the same tiny dense and MoE models on the same batches."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_torchtitan.py"


def test_vs_torchtitan_smoke(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"llama-tiny", "qwen3moe-tiny"}
    for name, row in rows.items():
        ours, base = row["xplan"], row["baseline"]
        assert ours["params"] == base["params"], name  # the same model on both sides
        assert len(ours["losses"]) == len(base["losses"]) == 3
        # the same synthetic batches from a 0.02-normal init: both start at ~ln(vocab) and stay close
        assert abs(ours["losses"][0] - math.log(512)) < 0.1
        assert abs(ours["losses"][0] - base["losses"][0]) < 0.01 * base["losses"][0], name
        for side in (ours, base):
            assert side["tokens_per_s"] > 0 and side["peak_memory_gib"] > 0
        assert ours["predicted_step_time_s"] > 0 and ours["predicted_peak_gib"] > 0
        assert row["tokens_ratio"] == ours["tokens_per_s"] / base["tokens_per_s"]
    for header in ("tokens/s", "peak GiB", "pred step s", "pred/meas", "(xplan / baseline)"):
        assert header in proc.stdout
