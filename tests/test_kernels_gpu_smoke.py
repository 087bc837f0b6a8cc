"""benchmarks/kernels_gpu.py (the GPU kernel checks and timings) runs end to end on CPU in its
`--smoke` mode (TRITON_INTERPRET=1, tiny sizes), so the script a lent GPU runs cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_gpu_script_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--smoke", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == {"rmsnorm", "permute", "attention", "flex vs blockwise", "model"}
    assert all(r["ok"] for r in rows)
    refused = {r["impl"] for r in rows if r["note"].startswith("refused on cpu")}
    assert refused == {"flash", "flash1", "flex"}  # flex: no flex_attention backward on CPU in torch 2.13
