"""GPU check (one prepared script for a lent GPU): predicted vs measured peak memory and step time.

1. a profile: `xplan calibrate --quick` on this GPU (one process), or --profile (e.g. h100, h200);
2. two plans at world size 1 (bf16, FSDP on one rank): a tiny and a mid-size Qwen3-MoE;
3. `xplan run plan.yaml --steps K --json` for each (the real runtime);
4. a table: predicted / measured step time and peak memory (max_memory_allocated), with ratios,
   for the calibrated profile and for every --compare profile (priced, not re-run).

    python benchmarks/gpu_check.py                      # calibrate, then run both plans
    python benchmarks/gpu_check.py --profile h100 --compare h200
    python benchmarks/gpu_check.py --device cpu --quick # smoke test of this script on a CPU machine

Where xplan is not installed (a bare lent machine with torch): put the package on PYTHONPATH
without installing it (pydantic may need carrying as wheels), and run from outside the repo:
    mkdir -p /tmp/site/xplan && cp -r xplan/. /tmp/site/xplan/ && for d in planner runtime cost_models \
      hw_profiles; do ln -s $(pwd -P)/$d /tmp/site/xplan/$d; done
    cd /tmp && PYTHONPATH=/tmp/site python3 <repo>/benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "tiny": ({"model_type": "qwen3_moe", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
              "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512, "norm_topk_prob": True,
              "max_position_embeddings": 8192, "tie_word_embeddings": False},
             {"seq_len": 1024, "global_batch": 4, "micro_batch": 2}),
    "mid": ({"model_type": "qwen3_moe", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
             "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 512, "norm_topk_prob": True,
             "max_position_embeddings": 8192, "tie_word_embeddings": False},
            {"seq_len": 2048, "global_batch": 8, "micro_batch": 4}),
}


def price(model_dir: Path, profile: str, shape: dict, kernels: dict, precision: str):
    from xplan.layout import Layout
    from xplan.planner.pricing import Workload
    from xplan.planner.pricing import price as price_layout

    layout = Layout(devices=1, fsdp=1, micro_batch=shape["micro_batch"], precision=precision, kernels=kernels)
    return price_layout(Workload(str(model_dir), profile, shape["seq_len"], shape["global_batch"]), layout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="use this profile (name or YAML) instead of calibrating")
    parser.add_argument("--compare", nargs="*", default=None,
                        help="also price with these profiles (default: h100 and h200)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "npu", "cpu"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--kernels", choices=("eager", "fused"), default="eager",
                        help="kernels.elementwise of the plans (fused compiles each block: slower start)")
    parser.add_argument("--quick", action="store_true", help="smaller models and steps (CPU smoke test)")
    parser.add_argument("--keep", help="write models, profile and plans here (default: a temp dir)")
    args = parser.parse_args()
    import torch

    if args.device != "cpu" and not getattr(torch, args.device).is_available():
        print(f"no {args.device} device here; pass --device cpu for a smoke test", file=sys.stderr)
        return 2
    precision = "fp32" if args.device == "cpu" else "bf16"
    kernels = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": args.kernels}
    compare = args.compare if args.compare is not None else (["h100", "h200"] if args.device == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="xplan-gpu-check-") as tmp:
        root = Path(args.keep or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if args.profile:
            profile = args.profile
        else:
            from xplan.cli.calibrate_cmd import run_calibration
            from xplan.hw_profiles import save_profile

            t0 = time.perf_counter()
            cal = run_calibration(processes=1, quick=True, device=args.device,
                                  command="xplan calibrate --processes 1 --quick")
            profile = str(save_profile(cal.profile, root / "calibrated.yaml", header=cal.header))
            print(f"calibrated in {time.perf_counter() - t0:.0f} s: {json.dumps(cal.summary())}", flush=True)
        rows = []
        for name in args.models:
            config, shape = MODELS[name]
            if args.quick:
                config = {**config, "num_hidden_layers": 2, "vocab_size": 1024}
                shape = {**shape, "seq_len": 256, "global_batch": 2, "micro_batch": 1}
            model_dir = root / name
            model_dir.mkdir(exist_ok=True)
            (model_dir / "config.json").write_text(json.dumps(config))
            est = price(model_dir, profile, shape, kernels, precision)
            from xplan.plan import make_plan, save_plan

            training = {"seq_len": shape["seq_len"], "global_batch": shape["global_batch"], "steps": args.steps,
                        "optimizer": {"lr": 1e-4}, "schedule": {"kind": "constant"}}
            plan = save_plan(make_plan(str(model_dir), profile, est.layout, training,
                                       {"step_time_s": est.step_time_s, "memory_gib": est.memory.gib()}),
                             root / f"plan-{name}.yaml")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", "from xplan.cli import entry; entry()", "run", str(plan),
                                   "--steps", str(args.steps), "--device", args.device, "--json"],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                print(f"{name}: xplan run failed ({proc.returncode}):\n{proc.stderr[-2500:]}", flush=True)
                continue
            run = json.loads(proc.stdout)
            print(f"{name}: ran {args.steps} steps in {time.perf_counter() - t0:.0f} s; predicted time_s "
                  + ", ".join(f"{k} {v:.4f}" for k, v in est.time.items() if v)
                  + "; memory GiB " + ", ".join(f"{k} {v:.2f}" for k, v in est.memory.gib().items() if v), flush=True)
            for prof_name in [profile, *compare]:
                e = est if prof_name == profile else price(model_dir, prof_name, shape, kernels, precision)
                # max_memory_allocated excludes what the caching allocator reserves beyond it
                allocated = (e.memory.total - e.memory.overhead) / 2**30
                rows.append((name, Path(prof_name).stem, e.step_time_s, run["step_time_s"], allocated,
                             run["peak_memory_gib"]))
        print(f"\n{'model':6} {'profile':24} {'pred step s':>11} {'meas step s':>11} {'ratio':>6} "
              f"{'pred alloc GiB':>14} {'meas peak GiB':>13} {'ratio':>6}")
        for name, prof_name, ps, ms, pm, mm in rows:
            print(f"{name:6} {prof_name:24} {ps:>11.4f} {ms:>11.4f} {ps / ms:>6.2f} {pm:>14.2f} {mm:>13.2f} "
                  f"{pm / mm:>6.2f}")
        print("(ratio = predicted / measured; predicted allocated = the estimate less the allocator's fragmentation "
              "overhead; measured peak = max_memory_allocated on GPU, RSS peak on CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
