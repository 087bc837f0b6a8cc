"""Fused attention at the validation rows' own shapes: measured forward / backward vs the profile.

The profile prices attention as model FLOPs (causal = 1/2 of the pairs; backward = 2 x forward,
the scores a fused backward recomputes left out) at `attention_efficiency(seq_len)`. This script
takes, for each expressible `xplan validate` case, one layer's attention on one rank (micro-batch
rows, heads split by tp x sp, the full sequence, causal), prices its forward and backward as
`op_time` does, and times torch SDPA's fused kernels at that shape for a sustained window:
`flash` (FlashAttention-2) and `cudnn` (cuDNN fused attention, what Transformer Engine runs on
Hopper). The ratio is predicted / measured time (below 1: the profile is too fast).

    python benchmarks/attention_shapes.py --profile h200 --cases-on all    # on an H200 / H100
    python benchmarks/attention_shapes.py --device cpu --quick --only tt_l8b_8_fsdp   # smoke test

Cases whose attention has a sliding window are skipped (the timed kernel would be full causal).
"""

from __future__ import annotations

import argparse
import json

from gemm_shapes import add_case_arguments, cases_from_args, sustained_seconds

KERNELS = ("flash", "sdpa")  # the profile's fused-kernel fit (FlashAttention-3 on Hopper), torch SDPA


def case_attention(case, profile):
    """((batch, heads, seq, head_dim, v_head_dim), {kernel: (forward s, backward s)}) of one layer's
    attention on one rank, priced for each of KERNELS; None without plain causal attention."""
    from dataclasses import replace

    from xplan.app.validation import _model_config, case_layout
    from xplan.cost_models.compute import op_time
    from xplan.cost_models.estimate import rank_work
    from xplan.cost_models.ops import priced_ops
    from xplan.planner.trace import trace_model

    config = _model_config(case)
    if config.sliding_window:
        return None
    trace = trace_model(config, case.seq_len, micro_batch=1, loss=case.loss)
    layout = case_layout(case)
    work = rank_work(trace, layout, case.imbalance, case.recompute_every_mm)
    ops = [op for op in priced_ops(trace) if op.category == "attention"]
    if not ops:
        return None
    layer = [op for op in ops if op.group == ops[0].group]  # one block kind: one layer's attention
    predicted = {}
    for kernel in KERNELS:
        kernel_work = replace(work, attention_kernel=kernel)
        predicted[kernel] = tuple(sum(op_time(op, kernel_work, profile) for op in layer if op.phase == phase)
                                  for phase in ("forward", "backward"))
    heads = max(1, config.num_heads // (layout.tp * layout.sp))
    qk_dim = (config.qk_nope_head_dim + config.qk_rope_head_dim) or config.head_dim
    v_dim = config.v_head_dim or config.head_dim
    return (layout.micro_batch, heads, case.seq_len, qk_dim, v_dim), predicted


def _runners(shape, backend: str, device: str):
    """(forward, backward) zero-argument callables of causal SDPA at `shape` on `backend`."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d, dv = shape
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(b, h, s, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, s, dv, generator=gen).to(device, dtype).requires_grad_()
    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "math": SDPBackend.MATH}[backend]

    def forward():
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = forward()
    grad = torch.randn_like(out)

    def backward():
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    return forward, backward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_arguments(parser)
    parser.add_argument("--window", type=float, default=0.5, help="timed seconds per kernel")
    parser.add_argument("--backends", nargs="+", default=["flash", "cudnn"], choices=("flash", "cudnn", "math"))
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: seq / 16, math kernel, short windows")
    args = parser.parse_args(argv)
    from xplan.hw_profiles import load_profile

    cases = cases_from_args(args)
    if cases is None:
        return 2
    backends = ["math"] if args.device == "cpu" else args.backends
    shapes: dict[tuple, tuple[dict, list[str]]] = {}
    for case in cases:
        found = case_attention(case, load_profile(args.profile or case.hardware))
        if found is None:
            print(f"  {case.id}: skipped (sliding-window or no attention)", flush=True)
            continue
        shape, predicted = found
        if args.quick:
            shape = (shape[0], min(shape[1], 2), max(16, shape[2] // 16), shape[3], shape[4])
        shapes.setdefault(shape, (predicted, []))[1].append(case.id)  # one profile: one price per shape
    window = 0.05 if args.quick else args.window
    print("predicted: the profile's flash fit and its sdpa price; measured: torch SDPA backends; "
          "ratio = predicted / measured (flash fit vs cudnn, sdpa vs flash)")
    print(f"{'b x h x s x d':>20} {'pass':>4} {'pred flash':>10} {'pred sdpa':>10} "
          + " ".join(f"{b:>8}" for b in backends) + f" {'fit/cudnn':>9} {'sdpa/fa2':>8}  cases")
    rows = []
    for shape, (predicted, ids) in sorted(shapes.items()):
        measured = {}
        for backend in backends:
            try:
                forward, backward = _runners(shape, backend, args.device)
                measured[backend] = (sustained_seconds(forward, window, args.device),
                                     sustained_seconds(backward, window, args.device))
            except RuntimeError as err:  # a backend that refuses this shape (head dim, dtype)
                print(f"  {backend} refused {shape}: {str(err).splitlines()[0][:120]}", flush=True)
        for i, name in enumerate(("fwd", "bwd")):
            fit, sdpa = predicted["flash"][i], predicted["sdpa"][i]
            times = " ".join(f"{measured[b][i] * 1e3:>8.3f}" if b in measured else f"{'-':>8}" for b in backends)
            r_fit = f"{fit / measured['cudnn'][i]:>9.2f}" if "cudnn" in measured else f"{'-':>9}"
            r_sdpa = f"{sdpa / measured['flash'][i]:>8.2f}" if "flash" in measured else f"{'-':>8}"
            print(f"{'x'.join(map(str, shape[:4])):>20} {name:>4} {fit * 1e3:>10.3f} {sdpa * 1e3:>10.3f} {times} "
                  f"{r_fit} {r_sdpa}  {', '.join(ids)}", flush=True)
        rows.append({"shape": list(shape), "predicted_s": {k: {"fwd": f, "bwd": b} for k, (f, b) in predicted.items()},
                     "measured_s": {b: {"fwd": f, "bwd": w} for b, (f, w) in measured.items()}, "cases": ids})
        if args.json:  # after every shape: a run cut short keeps what it measured
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
