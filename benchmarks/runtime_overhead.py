"""Runtime overhead: `xplan run`'s train loop at world size 1 against a plain eager loop.

Both train the same model (same config, seed and initial weights) on the same synthetic data with
the same AdamW settings and gradient accumulation:

- runtime: the plan executed by `xplan.runtime.train` in this process (process group, meshes,
  FSDP2 on a 1-rank mesh, the plan's loss kernel, gradient clipping, LR schedule, logging);
- plain:   `loss = cross_entropy(model(x), y)`; `loss.backward()`; `AdamW.step()`.

Each of `--runs` runs (interleaved runtime / plain, to share the machine's noise) executes
`--steps` steps; a run's figure is its median step time without the first step (as `xplan run`
reports it). Prints the median over runs for each and the ratio runtime / plain (target ≤ 1.10).

    python benchmarks/runtime_overhead.py [--threads 1] [--device cpu|cuda] [--loss chunked|full]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL = {
    "model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def write_plan(root: Path, args) -> Path:
    from xplan.layout import Layout
    from xplan.plan import make_plan, save_plan

    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MODEL))
    layout = Layout(devices=1, fsdp=1, micro_batch=args.micro_batch, precision="fp32",
                    kernels={"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": args.loss,
                             "elementwise": "eager"})
    training = {"seq_len": args.seq_len, "global_batch": args.global_batch, "steps": args.steps, "seed": 0,
                "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"}}
    return save_plan(make_plan(str(model_dir), "cpu", layout, training), root / "plan.yaml")


def runtime_run(plan_path: Path, args) -> tuple[float, float]:
    from xplan.runtime.train import RunOptions, run_plan

    summary = run_plan(plan_path, RunOptions(steps=args.steps, device_type=args.device, live=False))
    return summary["step_time_s"], summary["host_cpu_s"]


def plain_run(plan_path: Path, args) -> tuple[float, float]:
    import xplan.runtime as xr
    from xplan.plan import load_plan
    from xplan.runtime.train.data import SyntheticData

    plan = load_plan(plan_path)
    training = plan.training
    device = torch.device(args.device)
    model = xr.load_model(plan.model, device=device, seed=training.seed)
    opt = training.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)  # torch's default implementation
    source = SyntheticData(model.config.vocab_size, training.seq_len, training.data.seed)
    tokens = training.global_batch * training.seq_len
    times, cpu = [], []
    for step in range(args.steps):
        sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        windows = source.global_batch(step, training.global_batch)
        for start in range(0, training.global_batch, args.micro_batch):
            w = windows[start:start + args.micro_batch].to(device)
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum") / tokens
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        sync(args.device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times[1:]), statistics.median(cpu[1:])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--loss", choices=("chunked", "full"), default="chunked")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = write_plan(Path(tmp), args)
        runtime, plain = [], []
        for i in range(args.runs):
            runtime.append(runtime_run(plan_path, args))
            plain.append(plain_run(plan_path, args))
            print(f"run {i + 1}: runtime {runtime[-1][0] * 1e3:8.1f} ms/step ({runtime[-1][1] * 1e3:6.1f} ms host CPU)"
                  f"   plain {plain[-1][0] * 1e3:8.1f} ms/step ({plain[-1][1] * 1e3:6.1f} ms host CPU)", flush=True)
    rt, pl = (statistics.median(r[0] for r in runs) for runs in (runtime, plain))
    rt_cpu, pl_cpu = (statistics.median(r[1] for r in runs) for runs in (runtime, plain))
    print(f"\nmodel: qwen3_moe {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
          f"{MODEL['num_experts']} experts; seq {args.seq_len}, global batch {args.global_batch}, micro-batch "
          f"{args.micro_batch}; loss {args.loss}; {args.device}, {torch.get_num_threads()} threads")
    print(f"runtime step (median of {args.runs}): {rt * 1e3:.1f} ms")
    print(f"plain loop step (median of {args.runs}): {pl * 1e3:.1f} ms")
    print(f"ratio runtime / plain: {rt / pl:.3f}  (target <= 1.10)")
    print(f"host CPU time per step (median): runtime {rt_cpu * 1e3:.1f} ms, plain {pl_cpu * 1e3:.1f} ms, "
          f"ratio {rt_cpu / pl_cpu:.3f} (less sensitive to other load on a shared machine)")


if __name__ == "__main__":
    main()
