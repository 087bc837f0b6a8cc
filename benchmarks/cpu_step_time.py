"""Predicted vs measured step time of a small CPU training run (acceptance: ratio within 0.75-1.25).

For each world size (default 1 and 2):
1. a profile: `xplan calibrate --processes W --threads T` (one rank of a W-process run, the W
   ranks measured at once), or the one given with --profile;
2. a plan for a small Qwen3-MoE (hidden 512, 4 layers, 8 experts top-2, seq 512) with FSDP over
   the W ranks, fp32 (what the CPU runtime runs) and kernels.elementwise = eager, priced by the
   estimator on that profile;
3. `xplan run plan.yaml --steps K --json` (the real runtime, gloo) --runs times, the world sizes
   interleaved so they share the machine's noise; a run's figure is its median step time without
   the first step (as `xplan run` reports it). Each rank runs --threads torch threads (default 1).
Prints predicted, measured (median over runs, with min-max spread) and predicted / measured, and
the predicted breakdown by op category next to a torch-profiler breakdown of the real step
(--breakdown, world size 1 in this process).

    python benchmarks/cpu_step_time.py                         # calibrate, then run (~10 min here)
    python benchmarks/cpu_step_time.py --profile hw_profiles/cpu.yaml --worlds 2
    python benchmarks/cpu_step_time.py --quick-calibrate --runs 3 --breakdown
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

MODEL = {
    "model_type": "qwen3_moe", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}
KERNELS = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": "eager"}


def profile_for(world: int, args, root: Path) -> Path:
    if args.profile:
        return Path(args.profile).resolve()
    from xplan.cli.calibrate_cmd import run_calibration

    t0 = time.perf_counter()
    last = [""]

    def progress(done: int, total: int, label: str) -> None:
        if label != last[0]:
            print(f"\r  calibrate --processes {world}: {done}/{total} {label:<40}", end="", file=sys.stderr, flush=True)
            last[0] = label

    threads = threads_for(world, args)
    result = run_calibration(processes=world, threads=threads, quick=args.quick_calibrate, progress=progress,
                             command=f"xplan calibrate --processes {world} --threads {threads}"
                             + (" --quick" if args.quick_calibrate else ""))
    path = root / f"cpu-{world}rank.yaml"
    from xplan.hw_profiles import save_profile

    save_profile(result.profile, path, header=result.header)
    s = result.summary()
    print(f"\r  calibrated --processes {world} in {time.perf_counter() - t0:.0f} s: fp32 "
          f"{s['peak_tflops']['fp32'] * 1e3:.0f} GFLOPS, bf16 {s['peak_tflops']['bf16'] * 1e3:.0f} GFLOPS, "
          f"overhead {s['kernel_overhead_us']:.1f} us/kernel, memory {s['memory_gbps']:.1f} GB/s, "
          f"all_gather {s['collective_busbw_gbps']['all_gather']:.2f} GB/s, "
          f"latency {s['collective_latency_us']:.0f} us" + " " * 10, file=sys.stderr)
    return path


def threads_for(world: int, args) -> int:
    """Torch threads per rank: --threads, or what `xplan run` picks (cores / world size)."""
    return args.threads if args.threads and args.threads > 0 else max(1, (os.cpu_count() or 1) // world)


def layout_for(world: int, args):
    from xplan.layout import Layout

    return Layout(devices=world, fsdp=world, micro_batch=args.micro_batch, precision=args.precision,
                  kernels=dict(KERNELS))


def write_plan(world: int, profile: Path, args, root: Path) -> tuple[Path, dict]:
    from xplan.plan import make_plan, save_plan
    from xplan.planner.pricing import Workload, price

    est = price(Workload(str(root / "model"), str(profile), args.seq_len, args.global_batch), layout_for(world, args))
    d = est.to_dict()
    training = {"seq_len": args.seq_len, "global_batch": args.global_batch, "steps": args.steps, "seed": 0,
                "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"}}
    predictions = {"step_time_s": d["step_time_s"], "memory_gib": d["memory_gib"], "time_s": d["time_s"]}
    plan = make_plan(str(root / "model"), str(profile), est.layout, training, predictions)
    return save_plan(plan, root / f"plan-{world}.yaml"), d


def predicted_categories(world: int, profile: Path, args, root: Path) -> dict[str, float]:
    """The estimate's compute split by op category (per step, seconds), from the cost model's own
    per-op pricing (cost_models.compute.op_time over cost_models.ops.priced_ops)."""
    from xplan.cost_models.compute import RankWork, op_time
    from xplan.cost_models.ops import priced_ops
    from xplan.planner.pricing import get_trace, load_hw

    layout = layout_for(world, args)
    trace = get_trace(str(root / "model"), args.seq_len, KERNELS["loss"])
    prof = load_hw(str(profile))
    work = RankWork(token_factor=layout.micro_batch / layout.sp, precision=layout.precision, seq_len=args.seq_len,
                    traced_dtype_bytes=2 if trace.dtype in ("bfloat16", "torch.bfloat16") else 4,
                    fused_elementwise=False)
    counts = {k: b.count for k, b in trace.blocks.items()}
    ga = layout.grad_accum(args.global_batch)
    out: dict[str, float] = defaultdict(float)
    kernels: dict[str, int] = defaultdict(int)
    for op in priced_ops(trace):
        n = counts.get(op.group, 1) * ga
        out[op.category] += op_time(op, work, prof) * n
        kernels[op.category] += n
    out["kernels"] = float(sum(kernels.values()))
    return dict(out)


def run_once(plan: Path, steps: int, threads: int) -> dict:
    # world size 1 runs in the `xplan run` process (torch's threads: OMP_NUM_THREADS); spawned ranks
    # of larger runs take cores / world size, which --threads must then match.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", "from xplan.cli import entry; entry()", "run", str(plan), "--steps", str(steps), "--json"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"xplan run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def measured_breakdown(plan: Path, steps: int, threads: int) -> dict[str, float]:
    """Torch-profiler split of the real step (world size 1, in this process): top-level aten ops
    by category, per step, from the difference of a `steps`-step and a 1-step run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from xplan.runtime.train import RunOptions, run_plan

    torch.set_num_threads(threads)

    def one(k: int) -> tuple[dict[str, float], float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run_plan(plan, RunOptions(steps=k, device_type="cpu", live=False))
            wall = time.perf_counter() - t0
        cats: dict[str, float] = defaultdict(float)
        for e in prof.events():
            if not e.name.startswith("aten::"):
                continue
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith(("aten::", "Optimizer.step")):
                parent = parent.cpu_parent
            if parent is not None and parent.name.startswith("aten::"):
                continue  # counted in its top-level aten op
            cats[_category(e.name, parent)] += e.cpu_time_total / 1e6
            cats["kernels"] += 1
        return cats, wall

    a, wa = one(1)
    b, wb = one(steps)
    n = steps - 1
    out = {k: (b[k] - a.get(k, 0.0)) / n for k in b}
    out["wall"] = (wb - wa) / n
    return out


def _category(name: str, parent) -> str:
    if parent is not None and parent.name.startswith("Optimizer.step"):
        return "optimizer"
    op = name.removeprefix("aten::")
    if op in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear"):
        return "gemm"
    if "grouped_mm" in op:
        return "grouped"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention"
    return "memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="use this profile instead of calibrating (for every world size)")
    parser.add_argument("--quick-calibrate", action="store_true", help="calibrate with the reduced sweep")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank, for calibration and runs (default 1: on a small machine "
                             "shared with other jobs, several OpenMP threads per rank stall whenever another "
                             "process takes a core; 0: what `xplan run` picks, cores / world size)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile the real world-size-1 step and compare categories")
    parser.add_argument("--keep", help="write the model, profiles and plans here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="xplan-cpu-step-") as tmp:
        root = Path(args.keep or tmp).resolve()
        (root / "model").mkdir(parents=True, exist_ok=True)
        (root / "model" / "config.json").write_text(json.dumps(MODEL))
        print(f"model: qwen3_moe hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
              f"{MODEL['num_experts']} experts top-{MODEL['num_experts_per_tok']}, vocab {MODEL['vocab_size']}; "
              f"seq {args.seq_len}, global batch {args.global_batch}, micro-batch {args.micro_batch}, "
              f"{args.precision}, kernels {KERNELS}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
        setups = {}
        for w in args.worlds:
            profile = profile_for(w, args, root)
            plan, est = write_plan(w, profile, args, root)
            setups[w] = (profile, plan, est)
        measured: dict[int, list[float]] = {w: [] for w in args.worlds}
        for r in range(args.runs):
            for w in args.worlds:
                s = run_once(setups[w][1], args.steps, threads_for(w, args))
                measured[w].append(s["step_time_s"])
                print(f"  run {r + 1}/{args.runs} world {w}: {s['step_time_s']:.3f} s/step "
                      f"(predicted {setups[w][2]['step_time_s']:.3f}; load {os.getloadavg()[0]:.1f})", flush=True)

        print(f"\n{'world':>5} {'predicted s':>12} {'measured s':>11} {'spread (min-max)':>18} {'pred/meas':>10}"
              f"  profile")
        for w in args.worlds:
            profile, plan, est = setups[w]
            m = statistics.median(measured[w])
            print(f"{w:>5} {est['step_time_s']:>12.3f} {m:>11.3f} {min(measured[w]):>8.3f}-{max(measured[w]):<9.3f}"
                  f" {est['step_time_s'] / m:>10.3f}  {profile.name}")
        for w in args.worlds:
            profile, plan, est = setups[w]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in est["time_s"].items() if v)
            cats = predicted_categories(w, profile, args, root)
            split = ", ".join(f"{k} {v:.3f}" for k, v in cats.items() if k != "kernels")
            print(f"world {w} predicted time_s: {parts}; compute by op category: {split} "
                  f"({int(cats['kernels'])} kernels)")
        if args.breakdown and 1 in setups:
            print("\nworld 1 breakdown (s per step; measured = torch profiler, top-level aten ops, inflated by "
                  "the profiler):")
            meas = measured_breakdown(setups[1][1], args.steps, threads_for(1, args))
            pred = predicted_categories(1, setups[1][0], args, root)
            pred["optimizer"] = setups[1][2]["time_s"]["optimizer"]
            for k in ("gemm", "grouped", "attention", "memory", "optimizer", "kernels"):
                print(f"  {k:10s} predicted {pred.get(k, 0.0):9.3f}  measured {meas.get(k, 0.0):9.3f}")
            print(f"  wall per step under the profiler {meas['wall']:.3f}; sum of top-level ops "
                  f"{sum(v for k, v in meas.items() if k not in ('wall', 'kernels')):.3f}")
        if args.keep:
            (root / "results.json").write_text(json.dumps(
                {str(w): {"profile": str(setups[w][0]), "plan": str(setups[w][1]), "measured": measured[w],
                          "estimate": setups[w][2]} for w in args.worlds}, indent=1, default=str))


if __name__ == "__main__":
    main()
