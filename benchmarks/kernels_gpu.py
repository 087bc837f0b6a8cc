"""The kernel registry's implementations on a lent GPU: correctness against the torch path and
speed, in one table (runtime/kernels).

1. Triton RMSNorm (forward + backward) against `RMSNorm`'s torch ops, eager and compiled;
2. Triton MoE token permutation + unpermutation against `MoE.dispatch` / `MoE.combine`;
3. every `kernels.attention` choice, as the registry selects it per attention shape (GQA, GPT-OSS
   sliding window + sinks, GPT-OSS sinks, DeepSeek MLA widths), against the eager reference in
   fp32 (forward and gradients, tolerance 1e-5), timed in bf16;
4. flex_attention's backward against the blockwise path (GPT-OSS and MLA shapes, fp32);
5. a tiny MoE model and a tiny GPT-OSS model with every CUDA kernel the registry picks
   (`elementwise: fused` → Triton RMSNorm and compiled blocks, Triton permutation, `flash`
   attention), selective recompute included, against the default eager path in fp32.

    python benchmarks/kernels_gpu.py [--json kernels_gpu.json]   # H100 / H200 (xplan importable,
                                                                 # e.g. via benchmarks/gpu_session.sh)
    python benchmarks/kernels_gpu.py --smoke                     # CPU: TRITON_INTERPRET=1, tiny sizes

`--smoke` runs the same code on CPU at tiny sizes (tests/test_kernels_gpu_smoke.py) so the
script cannot rot; its timings mean nothing and the CUDA-only rows say "skipped". Exit status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class Row:
    section: str
    case: str
    impl: str
    error: float | None = None  # max |got - want| / max |want|
    tol: float | None = None
    torch_ms: float | None = None
    kernel_ms: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None or self.tol is None or self.error <= self.tol


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


def worst(pairs) -> float:
    return max((rel_err(a, b) for a, b in pairs), default=0.0)


def timed_ms(fn, device: str, repeats: int) -> float:
    import torch

    fn()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def forward_backward(fn, inputs, grad_seed: int = 0):
    """(output, gradients of every input that requires grad) for a fixed random output gradient."""
    import torch

    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(grad_seed), device=out.device,
                       dtype=out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, grad)


# ---------------------------------------------------------------------------------------- 1. RMSNorm
def check_rmsnorm(sizes, device: str, repeats: int) -> list:
    import torch

    from xplan.runtime.kernels.triton_rmsnorm import triton_rms_norm
    from xplan.runtime.models.layers import RMSNorm

    rows = []
    for rows_n, width in sizes["rmsnorm"]:
        module = RMSNorm(width, 1e-6).to(device)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
        case = f"{rows_n}x{width}"
        x = torch.randn(rows_n, width, device=device, requires_grad=True)
        want = forward_backward(lambda t, w, m=module: m(t), [x, module.weight])
        got = forward_backward(lambda t, w: triton_rms_norm(t, w, 1e-6), [x, module.weight])
        error = worst([(got[0], want[0]), *zip(got[1], want[1], strict=True)])
        xb, mb = x.detach().bfloat16().requires_grad_(), RMSNorm(width, 1e-6).to(device).bfloat16()

        def step(fn, t=xb):
            out = fn(t)
            out.backward(torch.ones_like(out))

        def triton_step(t, m=mb):
            return triton_rms_norm(t, m.weight, m.eps)

        torch_ms = timed_ms(lambda m=mb: step(m), device, repeats)
        kernel_ms = timed_ms(lambda: step(triton_step), device, repeats)
        rows.append(Row("rmsnorm", case + " fp32 check, bf16 time", "triton_rmsnorm", error, 1e-5, torch_ms,
                        kernel_ms))
        if device == "cuda":
            compiled = torch.compile(mb)
            rows.append(Row("rmsnorm", case + " bf16", "vs torch.compile(RMSNorm)", None, None,
                            timed_ms(lambda c=compiled: step(c), device, repeats), kernel_ms))
    return rows


# ---------------------------------------------------------------------------------------- 2. permute
def check_permute(sizes, device: str, repeats: int) -> list:
    import torch
    from torch import nn

    from xplan.runtime.kernels.triton_permute import TritonTokenPermuter
    from xplan.runtime.models.moe import MoE

    rows = []
    for tokens, width, experts, top_k in sizes["permute"]:
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(tokens, experts, generator=gen)
        scores[:, 1] = -1  # expert 1 never chosen: an empty expert
        ids = scores.topk(top_k, dim=-1).indices.to(device)
        weights = torch.rand(tokens, top_k, generator=gen).to(device)
        x = torch.randn(tokens, width, generator=gen).to(device)
        moe = MoE(nn.Identity(), nn.Identity(), experts, top_k)

        def run(permuter, x, w, moe=moe, ids=ids):
            moe.token_permuter = permuter
            x_sorted, counts, order = moe.dispatch(x, ids)
            return moe.combine(torch.tanh(x_sorted), w, order)

        inputs = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
        want = forward_backward(lambda a, b: run(None, a, b), inputs)
        got = forward_backward(lambda a, b: run(TritonTokenPermuter(), a, b), inputs)
        error = worst([(got[0], want[0]), *zip(got[1], want[1], strict=True)])
        xb, wb = x.bfloat16().requires_grad_(), weights.bfloat16().requires_grad_()

        def step(permuter, xb=xb, wb=wb):
            out = run(permuter, xb, wb)
            out.backward(torch.ones_like(out))

        rows.append(Row("permute", f"T={tokens} H={width} E={experts} k={top_k}", "triton", error, 1e-5,
                        timed_ms(lambda: step(None), device, repeats),
                        timed_ms(lambda: step(TritonTokenPermuter()), device, repeats)))
    return rows


# ---------------------------------------------------------------------------------------- 3-4. attention
ATTENTION_SHAPES = {  # name -> (q heads, kv heads, qk width, v width, window, sinks); then the smoke sizes
    "gqa": ((16, 4, 128, 128, None, False), (4, 2, 16, 16, None, False)),
    "gpt_oss_sliding": ((16, 2, 64, 64, 128, True), (4, 1, 8, 8, 6, True)),
    "gpt_oss_full": ((16, 2, 64, 64, None, True), (4, 1, 8, 8, None, True)),
    "mla": ((16, 16, 192, 128, None, False), (2, 2, 24, 16, None, False)),
}


def attention_inputs(shape: str, seq: int, device: str, dtype, small: bool):
    import torch

    hq, hkv, d, dv, window, with_sinks = ATTENTION_SHAPES[shape][1 if small else 0]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, seq, w, generator=gen) for h, w in ((hq, d), (hkv, d), (hkv, dv)))
    sinks = torch.randn(hq, generator=gen) if with_sinks else None
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, sinks) if t is not None]
    if sinks is None:
        tensors.append(None)
    return tensors, d**-0.5, window


def bound(fn, scale: float, window):
    """`fn(q, k, v, sinks)` for an implementation with the attention-core signature."""
    return lambda q, k, v, sinks: fn(q, k, v, scale, window, sinks, 0)


def check_attention(sizes, device: str, repeats: int) -> list:
    import torch

    from xplan.runtime.kernels.attention import (
        AttentionCase,
        attention_accepts,
        attention_function,
        eager_attention,
    )
    from xplan.runtime.kernels.registry import CHOICES, select

    rows = []
    small = device != "cuda"
    for shape in ATTENTION_SHAPES:
        (q, k, v, sinks), scale, window = attention_inputs(shape, sizes["seq"], device, torch.float32, small)
        case = AttentionCase(device, torch.float32, q.shape[1], q.shape[-1], v.shape[-1], window, sinks is not None,
                             k.shape[1])
        inputs = [q, k, v, sinks]
        want = forward_backward(bound(eager_attention, scale, window), inputs)
        for choice in CHOICES["attention"]:
            if device not in CHOICES["attention"][choice].get("attention", {}):
                rows.append(Row("attention", shape, choice, note=f"refused on {device} (exit 2 before spawning)"))
                continue
            name = select("attention", choice, "attention", device, lambda n, c=case: attention_accepts(n, c))
            fn = attention_function(name, case)
            got = forward_backward(bound(fn, scale, window), inputs)
            error = worst([(got[0], want[0]), *zip(got[1], want[1], strict=True)])
            bf16_case = AttentionCase(device, torch.bfloat16, *list(asdict(case).values())[2:])
            bf16_name = select("attention", choice, "attention", device, lambda n, c=bf16_case: attention_accepts(n, c))
            fast = attention_function(bf16_name, bf16_case)
            (qb, kb, vb, sb), _, _ = attention_inputs(shape, sizes["seq"], device, torch.bfloat16, small)

            def step(fn, bf16_inputs=(qb, kb, vb, sb)):
                out = fn(*bf16_inputs)
                out.backward(torch.ones_like(out))

            rows.append(Row("attention", shape, f"{choice}: {name} (bf16: {bf16_name})", error, 1e-5,
                            timed_ms(lambda e=bound(eager_attention, scale, window): step(e), device, repeats),
                            timed_ms(lambda f=bound(fast, scale, window): step(f), device, repeats),
                            "torch_ms = eager"))
    return rows


def check_flex(sizes, device: str) -> list:
    """flex_attention against the blockwise path: forward and gradients on CUDA, forward on CPU."""
    import torch

    from xplan.runtime.kernels.attention import blockwise
    from xplan.runtime.kernels.flex import flex_attention_core

    rows = []
    for shape in ("gpt_oss_sliding", "gpt_oss_full", "mla"):
        grad = device == "cuda"
        (q, k, v, sinks), scale, window = attention_inputs(shape, sizes["seq"], device, torch.float32, not grad)
        inputs = [q, k, v, sinks]
        if grad:
            want = forward_backward(bound(blockwise, scale, window), inputs)
            got = forward_backward(bound(flex_attention_core, scale, window), inputs)
            error = worst([(got[0], want[0]), *zip(got[1], want[1], strict=True)])
            note = "forward and backward (q, k, v, sinks)"
        else:
            with torch.no_grad():
                detached = [t.detach() if t is not None else None for t in inputs]
                error = rel_err(flex_attention_core(*detached[:3], scale, window, detached[3]),
                                blockwise(*detached[:3], scale, window, detached[3]))
            note = "forward only: torch has no flex backward on CPU"
        rows.append(Row("flex vs blockwise", shape, "flex_attention", error, 1e-5, note=note))
    return rows


# ---------------------------------------------------------------------------------------- 5. models
MODELS = {
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=256, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "gpt_oss": dict(model_type="gpt_oss", vocab_size=256, hidden_size=256, intermediate_size=128,
                    num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                    num_experts_per_tok=2, swiglu_limit=7.0, max_position_embeddings=4096, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def check_models(sizes, device: str) -> list:
    """The registry's CUDA kernels on a model against the default eager path, fp32, one forward and
    backward. CUDA: `flash` attention, Triton RMSNorm and permutation, compiled blocks. Smoke (CPU):
    the Triton kernels the registry picks for CUDA, interpreted, on CPU tensors; no compile."""
    import torch

    from xplan.layout import Layout
    from xplan.runtime import build_model
    from xplan.runtime.kernels import apply_kernels
    from xplan.runtime.models import model_config_from_dict
    from xplan.runtime.recompute import apply_recompute

    cuda = device == "cuda"
    rows = []
    for kind, raw in MODELS.items():
        config = model_config_from_dict({**raw, **sizes["model_overrides"]}, name=f"tiny-{kind}")
        ids = torch.randint(0, config.vocab_size, (2, sizes["model_seq"]), generator=torch.Generator().manual_seed(2))
        for recompute in sizes["recompute"]:
            results, executed = [], {}
            for registry in (False, True):
                model = build_model(config, device=device, seed=0)
                if registry:
                    kernels = {"attention": "flash" if cuda else "sdpa", "elementwise": "fused"}
                    layout = Layout(devices=1, fsdp=1, precision="fp32", kernels=kernels)
                    executed = apply_kernels(model, layout, "cuda", triton_ok=lambda: True)
                for block in model.model.layers:
                    apply_recompute(block, recompute)
                    if registry and cuda:
                        block.compile()
                loss = model(ids.to(device)).float().logsumexp(-1).mean()
                loss.backward()
                results.append([loss.detach()] + [p.grad for p in model.parameters()])
            error = worst(zip(results[1], results[0], strict=True))
            where = "fp32, compiled blocks" if cuda else "Triton interpreted on CPU tensors, no compile"
            rows.append(Row("model", f"{kind} recompute={recompute}", "registry's CUDA kernels", error, 1e-4,
                            note=f"{where}; {json.dumps(executed)}"))
    return rows


SIZES = {
    "gpu": {"rmsnorm": [(16384, 4096), (8192, 7168)], "permute": [(16384, 4096, 128, 8), (8192, 7168, 256, 8)],
            "seq": 4096, "model_seq": 512, "model_overrides": {}, "recompute": ("none", "selective"), "repeats": 20},
    "smoke": {"rmsnorm": [(6, 24)], "permute": [(9, 8, 6, 2)], "seq": 20, "model_seq": 4, "repeats": 1,
              "recompute": ("selective",),
              "model_overrides": {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 16,
                                  "moe_intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "head_dim": 8, "num_experts": 4, "num_local_experts": 4}},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections to run: rmsnorm permute attention flex model (default: all)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    sizes = SIZES["smoke" if args.smoke else "gpu"]
    sections = {"rmsnorm": lambda: check_rmsnorm(sizes, device, sizes["repeats"]),
                "permute": lambda: check_permute(sizes, device, sizes["repeats"]),
                "attention": lambda: check_attention(sizes, device, sizes["repeats"]),
                "flex": lambda: check_flex(sizes, device),
                "model": lambda: check_models(sizes, device)}
    rows: list[Row] = []
    for name in args.only or sections:
        start = time.perf_counter()
        try:
            rows += sections[name]()
        except Exception as exc:  # one failing section must not hide the others
            rows.append(Row(name, "-", "-", float("inf"), 0.0, note=f"{type(exc).__name__}: {exc}"[:300]))
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: timings meaningless)"
    print(f"kernels on {name}, torch {torch.__version__}")
    header = f"{'section':<18} {'case':<34} {'impl':<52} {'rel err':>9} {'tol':>7} {'ok':>3} " \
             f"{'torch ms':>9} {'kernel ms':>9} {'speedup':>7}  note"
    print(header)
    for r in rows:
        speedup = f"{r.torch_ms / r.kernel_ms:7.2f}" if r.torch_ms and r.kernel_ms else " " * 7
        cells = [f"{r.section:<18}", f"{r.case:<34}", f"{r.impl[:52]:<52}",
                 f"{r.error:9.1e}" if r.error is not None else " " * 9, f"{r.tol:7.0e}" if r.tol else " " * 7,
                 f"{'yes' if r.ok else 'NO':>3}", f"{r.torch_ms:9.3f}" if r.torch_ms else " " * 9,
                 f"{r.kernel_ms:9.3f}" if r.kernel_ms else " " * 9, speedup]
        print(" ".join(cells) + "  " + r.note)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "torch": torch.__version__,
                       "rows": [{**asdict(r), "ok": r.ok} for r in rows]}, handle, indent=1)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
