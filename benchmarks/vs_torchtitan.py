"""xplan's runtime against a torchtitan-style baseline: the same model, batch and precision, side by side.

The baseline is written here in plain torch the way torchtitan trains (it is not torchtitan's code):
its own Llama / Qwen3 / Qwen3-MoE modules built from the same config.json, `fully_shard` on every
block and on the root with torchtitan's default mixed precision (bf16 parameters, fp32 reductions),
full logits then cross-entropy, AdamW, gradient accumulation over the plan's micro-batches, and the
same synthetic batches as `xplan run` (xplan's SyntheticData, same seed). fp8 converts its linear
layers with torchao's `convert_to_float8_training` as torchtitan does. Both sides run in their own
process (one rank), so each side's peak memory is its own.

Prints a table per model: tokens/s, MFU (GPU), peak memory of each side, xplan's predicted step time
and peak against its measured ones, and the ratios xplan / baseline and predicted / measured.

    python benchmarks/vs_torchtitan.py                 # lent GPU: Llama-3-8B cut to fit, Qwen3-MoE slice
    python benchmarks/vs_torchtitan.py --precision fp8 --profile h100
    python benchmarks/vs_torchtitan.py --smoke         # CPU, tiny models, a few steps (CI: < 60 s)

On a bare lent machine without xplan installed, put it on PYTHONPATH as benchmarks/gpu_session.sh does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = Path(__file__).resolve().parents[1] / "runtime" / "models" / "presets"
# name -> (preset, config overrides, shape); GPU sizes fit one 80 GB GPU in bf16 with FSDP on one rank.
GPU_MODELS = {
    "llama3-8b-cut": ("llama3-8b", {"num_hidden_layers": 8},
                      {"seq_len": 4096, "global_batch": 8, "micro_batch": 2}),
    "qwen3-moe-slice": ("qwen3-30b-a3b", {"num_hidden_layers": 8},
                        {"seq_len": 4096, "global_batch": 8, "micro_batch": 2}),
}
SMOKE_MODELS = {
    "llama-tiny": ({"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "tie_word_embeddings": False},
                   {"seq_len": 64, "global_batch": 4, "micro_batch": 2}),
    "qwen3moe-tiny": ({"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                       "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                       "norm_topk_prob": True, "max_position_embeddings": 1024, "tie_word_embeddings": False},
                      {"seq_len": 64, "global_batch": 4, "micro_batch": 2}),
}


# ---------------------------------------------------------------- the baseline model (plain torch)
class Norm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope(x, cos, sin):  # x [b, h, s, d]; rotate-half convention, as the HF checkpoints use
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        bias = c.attention_bias
        self.wq = nn.Linear(c.hidden_size, self.h * self.d, bias=bias)
        self.wk = nn.Linear(c.hidden_size, self.kv * self.d, bias=bias)
        self.wv = nn.Linear(c.hidden_size, self.kv * self.d, bias=bias)
        self.wo = nn.Linear(self.h * self.d, c.hidden_size, bias=False)
        self.q_norm = Norm(self.d, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = Norm(self.d, c.rms_norm_eps) if c.qk_norm else None

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.h, self.d)
        k = self.wk(x).view(b, s, self.kv, self.d)
        v = self.wv(x).view(b, s, self.kv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        return self.wo(o.transpose(1, 2).reshape(b, s, self.h * self.d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Softmax top-k router; tokens sorted by expert, then one grouped GEMM (CUDA) or a loop per expert."""

    def __init__(self, c):
        super().__init__()
        self.e, self.k, self.norm_topk = c.num_experts, c.top_k, c.norm_topk_prob
        self.router = nn.Linear(c.hidden_size, self.e, bias=False)
        self.w1 = nn.Parameter(torch.empty(self.e, c.hidden_size, c.moe_intermediate_size))
        self.w3 = nn.Parameter(torch.empty(self.e, c.hidden_size, c.moe_intermediate_size))
        self.w2 = nn.Parameter(torch.empty(self.e, c.moe_intermediate_size, c.hidden_size))

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        order = experts.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.e)
        xs = x[order // self.k]
        if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(xs, self.w1, offs=offs)) * torch._grouped_mm(xs, self.w3, offs=offs)
            ys = torch._grouped_mm(h, self.w2, offs=offs)
        else:
            parts, start = [], 0
            for e, n in enumerate(counts.tolist()):
                t = xs[start:start + n]
                parts.append((F.silu(t @ self.w1[e]) * (t @ self.w3[e])) @ self.w2[e])
                start += n
            ys = torch.cat(parts)
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        out = torch.zeros_like(x).index_add_(0, order // self.k, ys)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, c, layer: int):
        super().__init__()
        self.attention_norm, self.ffn_norm = Norm(c.hidden_size, c.rms_norm_eps), Norm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn = MoE(c) if c.is_moe_layer(layer) else FeedForward(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.theta, self.head_dim = float(c.rope.get("rope_theta", 10000.0)), c.head_dim
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.norm = Norm(c.hidden_size, c.rms_norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)

    def forward(self, tokens):
        s = tokens.shape[1]
        inv = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=tokens.device).float() / self.head_dim)
        angles = torch.outer(torch.arange(s, device=tokens.device).float(), inv)
        angles = torch.cat((angles, angles), dim=-1)
        h = self.tok_embeddings(tokens)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


# ---------------------------------------------------------------- the baseline worker (its own process)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_gib(device: str) -> float:
    if device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return getattr(torch, device).max_memory_allocated() / 2**30


def baseline_worker(model_dir: str, shape: dict, steps: int, device: str, precision: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from xplan.runtime import load_config
    from xplan.runtime.train.data import SyntheticData

    config = load_config(model_dir)
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(device, "hccl")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    dev = torch.device(device, 0) if device != "cpu" else torch.device("cpu")
    if device != "cpu":
        getattr(torch, device).set_device(dev)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    if precision == "fp8":
        from torchao.float8 import convert_to_float8_training  # as torchtitan: every linear but the head

        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn != "output" and "router" not in fqn)
    mesh = init_device_mesh(device, (1,))
    half = precision in ("bf16", "fp8")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if half else torch.float32, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=dev)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda")
    data = SyntheticData(config.vocab_size, shape["seq_len"])
    mb, gb = shape["micro_batch"], shape["global_batch"]
    times, losses = [], []
    for step in range(steps):
        windows = data.windows(range(step * gb, (step + 1) * gb)).to(dev)
        if device != "cpu":
            getattr(torch, device).synchronize()
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        for i in range(0, gb, mb):
            w = windows[i:i + mb]
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum")
            (loss / (gb * shape["seq_len"])).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total) / (gb * shape["seq_len"]))  # float() synchronizes
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    step_time = statistics.median(times[1:] or times)
    return {"step_time_s": step_time, "tokens_per_s": gb * shape["seq_len"] / step_time, "losses": losses,
            "peak_memory_gib": peak_gib(device), "params": n_params}


# ---------------------------------------------------------------- xplan's side
def xplan_side(model_dir: Path, profile: str, shape: dict, steps: int, device: str, precision: str,
               root: Path) -> dict:
    from xplan.layout import Layout
    from xplan.plan import make_plan, save_plan
    from xplan.planner.pricing import Workload, price

    kernels = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": "eager"}
    layout = Layout(devices=1, fsdp=1, micro_batch=shape["micro_batch"], precision=precision, kernels=kernels)
    est = price(Workload(str(model_dir), profile, shape["seq_len"], shape["global_batch"]), layout)
    training = {"seq_len": shape["seq_len"], "global_batch": shape["global_batch"], "steps": steps,
                "optimizer": {"lr": 1e-4}, "schedule": {"kind": "constant"}}
    plan = save_plan(make_plan(str(model_dir), profile, est.layout, training,
                               {"step_time_s": est.step_time_s, "memory_gib": est.memory.gib()}),
                     root / f"plan-{model_dir.name}.yaml")
    proc = subprocess.run([sys.executable, "-c", "from xplan.cli import entry; entry()", "run", str(plan),
                           "--steps", str(steps), "--device", device, "--json"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"xplan run failed ({proc.returncode}):\n{proc.stderr[-2500:]}")
    run = json.loads(proc.stdout)
    from xplan.runtime import load_config
    from xplan.runtime.models.transformer import CausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in CausalLM(load_config(str(model_dir))).parameters())
    mem = est.memory
    allocated = (mem.total - mem.overhead) / 2**30  # max_memory_allocated excludes the allocator's overhead
    return {"step_time_s": run["step_time_s"], "tokens_per_s": run["tokens_per_s_per_device"],
            "peak_memory_gib": run["peak_memory_gib"], "losses": run["losses"],
            "predicted_step_time_s": est.step_time_s, "predicted_peak_gib": allocated,
            "params": n_params, "flops_per_token": est.flops_per_token}


def run_baseline(model_dir: Path, shape: dict, steps: int, device: str, precision: str) -> dict:
    args = json.dumps([str(model_dir), shape, steps, device, precision])
    proc = subprocess.run([sys.executable, __file__, "--baseline-worker", args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed ({proc.returncode}):\n{proc.stderr[-2500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mfu(tokens_per_s: float, flops_per_token: float | None, peak_tflops: float | None) -> float | None:
    if not flops_per_token or not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def table(rows: list[dict], memory_kind: str) -> str:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    head = (f"{'model':16} {'side':9} {'params':>11} {'tokens/s':>10} {'MFU':>6} {'step s':>8} "
            f"{'peak GiB':>9} {'pred step s':>11} {'pred/meas':>9} {'pred GiB':>9} {'pred/meas':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for side in ("xplan", "baseline"):
            s = r[side]
            pred = side == "xplan"
            lines.append(
                f"{r['model']:16} {side:9} {s['params']:>11,} {f(s['tokens_per_s'], '.1f'):>10} "
                f"{f(s.get('mfu'), '.1%'):>6} {f(s['step_time_s'], '.4f'):>8} {f(s['peak_memory_gib'], '.3f'):>9} "
                f"{f(s['predicted_step_time_s'] if pred else None, '.4f'):>11} "
                f"{f(s['predicted_step_time_s'] / s['step_time_s'] if pred else None, '.2f'):>9} "
                f"{f(s['predicted_peak_gib'] if pred else None, '.3f'):>9} "
                f"{f(s['predicted_peak_gib'] / s['peak_memory_gib'] if pred else None, '.2f'):>9}")
        lines.append(f"{r['model']:16} {'ratio':9} {'':>11} {f(r['tokens_ratio'], '.2f'):>10} {'':>6} "
                     f"{'':>8} {f(r['memory_ratio'], '.2f'):>9}   (xplan / baseline)")
    lines.append(f"peak memory: {memory_kind}; MFU from xplan's FLOPs per token and the profile's peak "
                 "(GPU only); pred = xplan's pricing of the plan")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, 3 steps (CI)")
    parser.add_argument("--profile", default=None, help="hardware profile pricing xplan's plan (GPU default h100)")
    parser.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="GPU precision")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--keep", help="write models and plans here (default: a temp dir)")
    parser.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        print(json.dumps(baseline_worker(*json.loads(args.baseline_worker))))
        return 0
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; pass --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    precision = "fp32" if args.smoke else args.precision
    profile = args.profile or ("cpu" if args.smoke else "h100")
    steps = args.steps or (3 if args.smoke else 10)
    catalogue = SMOKE_MODELS if args.smoke else GPU_MODELS
    names = args.models or list(catalogue)
    if unknown := [n for n in names if n not in catalogue]:
        print(f"unknown model(s) {unknown}; choose from {list(catalogue)}", file=sys.stderr)
        return 2
    from xplan.hw_profiles import load_profile

    peak_tflops = getattr(load_profile(profile).compute.peak_tflops, precision, None) if device != "cpu" else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="xplan-vs-torchtitan-") as tmp:
        root = Path(args.keep or tmp).resolve()
        for name in names:
            if args.smoke:
                config, shape = catalogue[name]
            else:
                preset, overrides, shape = catalogue[name]
                config = {**json.loads((PRESETS / f"{preset}.json").read_text()), **overrides}
            model_dir = root / name
            model_dir.mkdir(parents=True, exist_ok=True)
            (model_dir / "config.json").write_text(json.dumps(config))
            t0 = time.perf_counter()
            ours = xplan_side(model_dir, profile, shape, steps, device, precision, root)
            base = run_baseline(model_dir, shape, steps, device, precision)
            for side in (ours, base):
                side["mfu"] = mfu(side["tokens_per_s"], ours["flops_per_token"], peak_tflops)
            rows.append({"model": name, "shape": shape, "precision": precision, "device": device,
                         "profile": profile, "xplan": ours, "baseline": base,
                         "tokens_ratio": ours["tokens_per_s"] / base["tokens_per_s"],
                         "memory_ratio": ours["peak_memory_gib"] / base["peak_memory_gib"]})
            print(f"{name}: both sides ran {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}; precision {precision}; profile {profile}")
    print(table(rows, "process RSS high-water mark (CPU)" if device == "cpu" else "max_memory_allocated"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
