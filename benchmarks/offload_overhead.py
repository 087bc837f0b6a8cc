"""Offload overhead on this machine: measured (`xplan run`, world size 1) next to predicted.

The same plan runs without offload and with each offload setting (`--settings`), interleaved
`--runs` times to share the machine's noise; a run's figure is its median step time without the
first step (as `xplan run` reports it) - on CPU the process's CPU time per step (`host_cpu_s`),
which other processes on a shared machine disturb less than wall time. The overhead of a setting
is its step time minus the plain plan's; the prediction is the cost model's step time difference
for the same two layouts on the profile (`--profile`, default `cpu`: this machine's calibrated
copy bandwidth). On CPU the runtime's offload code runs synchronously (no side stream), so every
copy is on the critical path and the cost model prices it that way; on CUDA (`--device cuda
--profile h100`) the copies overlap compute on a side stream. The default layout has no
recompute, so activation offload moves every saved tensor (module outputs), enough bytes for the
copies to show above the noise; bf16, as the traced saved bytes are.

On CPU the copies go to freshly allocated memory, which the first touch makes slower than the
warm copy `xplan calibrate` measures as the cpu profile's link bandwidth; the table also shows the
prediction at this machine's measured fresh-copy bandwidth (`fresh_copy_gbps`). On CUDA the
pinned host buffers are cached by PyTorch's host allocator, so the link bandwidth applies.

    python benchmarks/offload_overhead.py [--runs 3] [--steps 6] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

MODEL = {
    "model_type": "qwen3", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}
SETTINGS = {"activations": ("activations",), "optimizer": ("optimizer",),
            "optimizer,activations": ("optimizer", "activations")}


def write_plan(root: Path, name: str, offload: tuple[str, ...], args) -> Path:
    from xplan.layout import Layout
    from xplan.plan import make_plan, save_plan

    model_dir = root / "model"
    if not model_dir.exists():
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(MODEL))
    layout = Layout(devices=1, fsdp=1, micro_batch=args.micro_batch, precision="bf16", recompute=args.recompute,
                    offload=offload, kernels={"loss": "chunked", "elementwise": "eager"})
    training = {"seq_len": args.seq_len, "global_batch": args.global_batch, "steps": args.steps, "seed": 0,
                "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"}}
    return save_plan(make_plan(str(model_dir), args.profile, layout, training), root / f"{name}.yaml")


def measured_step(plan_path: Path, args) -> float:
    from xplan.runtime.train import RunOptions, run_plan

    summary = run_plan(plan_path, RunOptions(steps=args.steps, device_type=args.device, live=False,
                                             metrics_path=str(plan_path.with_suffix(".jsonl"))))
    return summary["host_cpu_s"] if args.device == "cpu" else summary["step_time_s"]


def predicted_step(plan_path: Path) -> tuple[float, dict]:
    from xplan.plan import load_plan
    from xplan.planner.pricing import Workload, price

    plan = load_plan(plan_path)
    est = price(Workload(plan.model, plan.hardware, plan.training.seq_len, plan.training.global_batch), plan.layout)
    return est.step_time_s, {"offload_s": est.time["offload"], "optimizer_s": est.time["optimizer"],
                             "host_gib": est.memory.offloaded_to_host / 2**30}


def fresh_copy_gbps(nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """GB/s of copying into newly allocated CPU memory (what the synchronous CPU offload does)."""
    import time

    import torch

    source = torch.ones(nbytes // 4)
    torch.empty_like(source).copy_(source)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.empty_like(source).copy_(source)
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--recompute", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="offload settings to compare "
                        f"(comma-separated names of {', '.join(SETTINGS)}; 'optimizer,activations' counts as one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    wanted = [name for name in SETTINGS if name in args.settings]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plans = {"none": write_plan(root, "none", (), args)}
        plans.update({name: write_plan(root, name.replace(",", "+"), SETTINGS[name], args) for name in wanted})
        times: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(args.runs):
            for name, path in plans.items():
                times[name].append(measured_step(path, args))
        predicted = {name: predicted_step(path) for name, path in plans.items()}
    base = statistics.median(times["none"])
    from xplan.planner.pricing import load_hw

    link = load_hw(args.profile).host_bandwidth() / 1e9
    fresh = fresh_copy_gbps() if args.device == "cpu" else link
    rows = []
    for name in wanted:
        measured = statistics.median(times[name]) - base
        step, parts = predicted[name]
        rows.append({"offload": name, "measured_overhead_s": measured,
                     "predicted_overhead_s": step - predicted["none"][0],
                     "predicted_at_fresh_copy_s": (step - predicted["none"][0]) * link / fresh,
                     "step_s": statistics.median(times[name]), **parts})
    result = {"device": args.device, "profile": args.profile, "link_gbps": link, "fresh_copy_gbps": fresh,
              "baseline_step_s": base,
              "predicted_baseline_step_s": predicted["none"][0], "rows": rows, "runs": args.runs,
              "steps": args.steps, "model": MODEL, "seq_len": args.seq_len, "micro_batch": args.micro_batch}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"offload overhead per step on {args.device} (profile {args.profile}), baseline {base:.3f} s measured, "
          f"{predicted['none'][0]:.3f} s predicted; link {link:.2f} GB/s (profile), fresh-copy {fresh:.2f} GB/s "
          "(measured here)")
    print(f"{'offload':<24}{'measured s':>12}{'predicted s':>13}{'at fresh-copy s':>17}{'host GiB':>10}")
    for row in rows:
        print(f"{row['offload']:<24}{row['measured_overhead_s']:>12.4f}{row['predicted_overhead_s']:>13.4f}"
              f"{row['predicted_at_fresh_copy_s']:>17.4f}{row['host_gib']:>10.3f}")


if __name__ == "__main__":
    main()
