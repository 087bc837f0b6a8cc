"""GPU check of the allocator and offload (for a lent GPU): reserved vs allocated on a real step.

Runs `xplan run PLAN --steps K --json` (the runtime's own train loop, world size 1, bf16, full
recompute) on one mid-size Qwen3-MoE in separate processes, because the allocator's mode must be
set before CUDA's first allocation:

1. `allocator: caching`             - expandable segments off;
2. `allocator: expandable_segments` - what the runtime sets by default;
3. the same with `offload: optimizer,activations` - the offload path on a real device: peak
   allocated against the prediction, step time against (2).

For each it prints max_memory_allocated, max_memory_reserved and reserved / allocated - 1 (the
fragmentation the cost model adds as `overhead`) next to the profile's `memory.fragmentation`
(caching) and `memory.fragmentation_expandable`, and the predicted peak. Copy the measured
fractions into the profile with this run as their source only after checking them on several
plans; one small model is a sanity check, not a fit.

    python benchmarks/allocator_check.py [--profile h100] [--steps 6] [--json out.json]
    python benchmarks/allocator_check.py --device cpu   # smoke test of the script (no allocator stats)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {"model_type": "qwen3_moe", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3072,
         "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
         "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 512, "norm_topk_prob": True,
         "max_position_embeddings": 8192, "tie_word_embeddings": False}
SHAPE = {"seq_len": 4096, "global_batch": 8, "micro_batch": 4}
CASES = {"caching": ("caching", ()), "expandable": ("expandable_segments", ()),
         "expandable+offload": ("expandable_segments", ("optimizer", "activations"))}


SMOKE = {**MODEL, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 4,
         "moe_intermediate_size": 64}  # --device cpu: the script's plumbing only


def write_plan(root: Path, name: str, allocator: str, offload: tuple[str, ...], profile: str, steps: int,
               shape: dict, model: dict) -> Path:
    from xplan.layout import Layout
    from xplan.plan import make_plan, save_plan
    from xplan.planner.pricing import Workload, price

    model_dir = root / "model"
    if not model_dir.exists():
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(model))
    layout = Layout(devices=1, fsdp=1, micro_batch=shape["micro_batch"], recompute="full", allocator=allocator,
                    offload=offload, kernels={"loss": "chunked", "elementwise": "eager"})
    est = price(Workload(str(model_dir), profile, shape["seq_len"], shape["global_batch"]), layout)
    predictions = {k: v for k, v in est.to_dict().items() if k in ("memory_gib", "step_time_s")}
    training = {"seq_len": shape["seq_len"], "global_batch": shape["global_batch"], "steps": steps}
    return save_plan(make_plan(str(model_dir), profile, layout, training, predictions), root / f"{name}.yaml")


def run(plan: Path, device: str, steps: int) -> dict:
    """`xplan run` in a fresh process; the environment names no allocator option, so the plan's
    `allocator` decides (the runtime keeps an explicit user setting)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    cmd = [sys.executable, "-c", "from xplan.cli import entry; entry()", "run", str(plan), "--steps", str(steps),
           "--device", device, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
        return {"error": (done.stdout + done.stderr)[-2000:]}
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="h100")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; pass --device cpu for a smoke test of this script", file=sys.stderr)
        return 2
    from xplan.hw_profiles import load_profile

    memory = load_profile(args.profile).memory
    expected = {"caching": memory.fragmentation, "expandable": memory.fragmentation_expandable,
                "expandable+offload": memory.fragmentation_expandable}
    shape = SHAPE if args.device == "cuda" else {"seq_len": 64, "global_batch": 2, "micro_batch": 1}
    model = MODEL if args.device == "cuda" else SMOKE
    rows = []
    with tempfile.TemporaryDirectory(prefix="xplan-allocator-") as tmp:
        for name, (allocator, offload) in CASES.items():
            plan = write_plan(Path(tmp), name.replace("+", "_"), allocator, offload, args.profile, args.steps, shape,
                              model)
            summary = run(plan, args.device, args.steps)
            allocated, reserved = summary.get("peak_memory_gib"), summary.get("peak_reserved_gib")
            rows.append({"case": name, "allocator": summary.get("allocator_executed"), "offload": list(offload),
                         "allocated_gib": allocated, "reserved_gib": reserved,
                         "fragmentation": reserved / allocated - 1 if reserved and allocated else None,
                         "profile_fragmentation": expected[name], "predicted_peak_gib": summary.get("predicted_peak_gib"),
                         "step_time_s": summary.get("step_time_s"), "error": summary.get("error")})
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": args.profile, "device": args.device, "model": model,
                                               "shape": shape, "rows": rows}, indent=2))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"allocator check on {args.device} (profile {args.profile}), {model['num_hidden_layers']}-layer MoE, "
          f"seq {shape['seq_len']}, micro-batch {shape['micro_batch']}")
    print(f"{'case':<20}{'allocated':>10}{'reserved':>10}{'frag':>8}{'profile':>9}{'predicted':>11}{'step s':>8}")
    for r in rows:
        print(f"{r['case']:<20}{fmt(r['allocated_gib'], '.2f'):>10}{fmt(r['reserved_gib'], '.2f'):>10}"
              f"{fmt(r['fragmentation'], '.3f'):>8}{fmt(r['profile_fragmentation'], '.3f'):>9}"
              f"{fmt(r['predicted_peak_gib'], '.2f'):>11}{fmt(r['step_time_s'], '.3f'):>8}")
        if r["error"]:
            print(f"  error: {r['error']}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
