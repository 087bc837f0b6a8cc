"""Long sequences: the chunked loss is traced one chunk per distinct size past a bound, priced as
every chunk; the advertised 16M-token estimate finishes in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.trace_configs import tiny_config
from xplan.cost_models.compute import RankWork, group_times
from xplan.hw_profiles import load_profile
from xplan.planner.trace import tracer
from xplan.planner.trace.tracer import trace_uncached
from xplan.runtime.train.loss import DEFAULT_CHUNK_TOKENS


def test_representative_loss_chunks_price_like_every_chunk(monkeypatch):
    config = tiny_config("qwen3")
    seq = 5 * DEFAULT_CHUNK_TOKENS + 300  # five full chunks and a shorter last one
    expanded = trace_uncached(config, seq, 1, "none", "bfloat16", "chunked")
    monkeypatch.setattr(tracer, "EXPANDED_LOSS_CHUNKS", 2)
    compressed = trace_uncached(config, seq, 1, "none", "bfloat16", "chunked")

    repeated = [d for _, d in compressed.graph.nodes(data=True) if d.get("repeat")]
    assert repeated and {d["repeat"] for d in repeated} == {5} and {d["stage"] for d in repeated} == {"head"}
    ops = [n for n, d in expanded.graph.nodes(data=True) if d.get("type") == "op"]
    assert len([n for n, d in compressed.graph.nodes(data=True) if d.get("type") == "op"]) < len(ops)
    # Every summary number (FLOPs, bytes, saved bytes, backward peaks) is the expanded trace's.
    assert compressed.blocks == expanded.blocks and compressed.others == expanded.others
    profile = load_profile("h800")
    for work in (RankWork(token_factor=1.0, seq_len=seq), RankWork(token_factor=0.5, tp=2, seq_len=seq,
                                                                     fused_elementwise=False)):
        a, b = group_times(compressed, work, profile), group_times(expanded, work, profile)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_16m_token_estimate_finishes_quickly(tmp_path):
    """Issue 15: `--seq-len 16000000` (within the 16M cap) traced 16k loss chunks for minutes."""
    env = {**os.environ, "XPLAN_CACHE_DIR": str(tmp_path)}  # cold: the trace itself is timed
    start = time.perf_counter()
    cmd = ["estimate", "qwen3-30b-a3b", "h800", "--devices", "8", "--seq-len", "16000000", "--json"]
    proc = subprocess.run([sys.executable, "-c", "from xplan.cli import entry; entry()", *cmd], capture_output=True,
                          text=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["fits"] is False  # 16M tokens of activations on 8 devices do not fit
    assert elapsed < 30, f"took {elapsed:.1f} s"
