"""Trace speed: cold (empty cache) and cached traces of a full-size model, against the targets.

    python benchmarks/trace_speed.py [--model deepseek-v3] [--seq-len 4096] [--threads 2]

Cold = first trace in a fresh process with an empty cache directory (the model config is parsed
before the clock starts; imports are not timed). Cached = the same call again, read from disk.
Fresh process = a new interpreter reading the cached trace, as a warm CLI does: it must not
import torch (timed from the call, imports of xplan's planner included).
Targets (2 cores): cold <= 5 s, cached <= 0.2 s for deepseek-v3 at seq 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

COLD_TARGET_S = 5.0
CACHED_TARGET_S = 0.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-v3")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat-cached", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from xplan.planner.trace import trace_model
    from xplan.planner.trace.configs import load_model_config
    from xplan.runtime import load_config

    config = load_config(args.model)
    with tempfile.TemporaryDirectory() as cache_dir:
        # Everything this benchmark caches (the config too, for the fresh process) stays in here.
        os.environ["XPLAN_CACHE_DIR"] = cache_dir
        load_model_config(args.model)
        start = time.perf_counter()
        trace = trace_model(config, args.seq_len, args.micro_batch, cache_dir=cache_dir)
        cold = time.perf_counter() - start
        cached = []
        for _ in range(args.repeat_cached):
            start = time.perf_counter()
            hit = trace_model(config, args.seq_len, args.micro_batch, cache_dir=cache_dir)
            cached.append(time.perf_counter() - start)
            assert hit.from_cache
        fresh = fresh_process_hit(args.model, args.seq_len, args.micro_batch, cache_dir)
    best, worst = min(cached), max(cached)
    print(f"model {args.model}  seq {args.seq_len}  micro-batch {args.micro_batch}  threads {args.threads}")
    print(f"  flops/token {trace.flops_per_token / 1e9:.2f} GFLOP  graph {trace.graph.number_of_nodes()} nodes")
    print(f"  cold trace    {cold:7.3f} s   target <= {COLD_TARGET_S} s   "
          f"{'OK' if cold <= COLD_TARGET_S else 'SLOW'}  (ratio {cold / COLD_TARGET_S:.2f})")
    print(f"  cached trace  {worst:7.3f} s   target <= {CACHED_TARGET_S} s   "
          f"{'OK' if worst <= CACHED_TARGET_S else 'SLOW'}  (ratio {worst / CACHED_TARGET_S:.2f}, best {best:.3f} s)")
    print(f"  cached trace, fresh process {fresh['seconds']:7.3f} s   torch imported: {fresh['torch']}")
    return 0 if cold <= COLD_TARGET_S and worst <= CACHED_TARGET_S and not fresh["torch"] else 1


def fresh_process_hit(model: str, seq_len: int, micro_batch: int, cache_dir: str) -> dict:
    """A new interpreter loads the cached trace: seconds from the call, and whether torch loaded."""
    code = (
        "import json, sys, time\n"
        "start = time.perf_counter()\n"
        "from xplan.planner.trace import trace_model\n"
        f"hit = trace_model({model!r}, {seq_len}, {micro_batch}, cache_dir={cache_dir!r})\n"
        "print(json.dumps({'seconds': time.perf_counter() - start, 'torch': 'torch' in sys.modules, "
        "'from_cache': hit.from_cache}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["from_cache"], "the fresh process re-traced"
    return result


if __name__ == "__main__":
    raise SystemExit(main())
