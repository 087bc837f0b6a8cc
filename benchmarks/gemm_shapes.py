"""Sustained GEMM throughput at the validation rows' own shapes: measured vs the profile's model.

The GEMM ceiling (`compute.gemm.max_fraction`, the sustained MSMF rate of the best shapes) carries
most of every predicted step. This script takes, for each expressible `xplan validate` case, the
rank-level GEMMs that hold most of its predicted GEMM time (the shapes `op_time` prices: tokens
scaled by micro-batch / sp, widths split by tp, experts by ep), times each one for a sustained
window after the clock has settled under load, and prints predicted and measured TFLOPS side by
side. Per case, the share-weighted ratio says how its GEMM time would move if the profile matched
this device.

    python benchmarks/gemm_shapes.py --profile h100                 # on an H100 (its rows' shapes)
    python benchmarks/gemm_shapes.py --profile h200 --cases-on h100  # H100 rows' shapes, priced as h200
    python benchmarks/gemm_shapes.py --profile h200 --cases-on all   # every row's shapes, on an H200
    python benchmarks/gemm_shapes.py --device cpu --quick --only tt_l8b_8_fsdp   # smoke test

Grouped GEMMs are timed as a batched matmul of the same groups (equal rows per expert, as a
balanced router gives); fp8 GEMMs with torch._scaled_mm per group (tensor-wise scales). On CPU the
shapes are scaled down (--quick) and timed in fp32 against the `cpu` profile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict


def case_gemms(case, top: int):
    """[(m, n, k, groups, precision, share of the case's predicted GEMM time)] of its `top` GEMMs."""
    from xplan.app.validation import _model_config, case_layout
    from xplan.cost_models.compute import op_time, rank_gemm
    from xplan.cost_models.estimate import rank_work
    from xplan.cost_models.ops import priced_ops
    from xplan.hw_profiles import load_profile
    from xplan.planner.trace import trace_model

    config = _model_config(case)
    trace = trace_model(config, case.seq_len, micro_batch=1, loss=case.loss)
    layout = case_layout(case)
    work = rank_work(trace, layout, case.imbalance, case.recompute_every_mm)
    profile = load_profile(case.hardware)
    counts = {kind: block.count for kind, block in trace.blocks.items()}
    by_shape: dict[tuple, float] = defaultdict(float)
    for op in priced_ops(trace):
        if op.category not in ("gemm", "grouped"):
            continue
        m, n, k, groups, _ = rank_gemm(op, work)
        shape = (max(1, round(m)), max(1, round(n)), max(1, round(k)), groups, layout.precision)
        by_shape[shape] += op_time(op, work, profile) * counts.get(op.group, 1)  # repeat is in op_time
    total = sum(by_shape.values()) or 1.0
    ranked = sorted(by_shape.items(), key=lambda kv: -kv[1])[:top]
    return [(*shape, t / total) for shape, t in ranked]


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick validation cases, the device and the JSON output (shared by the
    shape benchmarks)."""
    parser.add_argument("--profile", help="price with this profile (default: each case's own hardware)")
    parser.add_argument("--cases-on", help="only cases on this hardware profile; 'all' for every case "
                                           "(default: --profile's name)")
    parser.add_argument("--only", default="", help="only cases whose id contains this text")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", help="also write the rows here (after every shape)")


def cases_from_args(args):
    """The cases `add_case_arguments`' options pick, or None (after saying why) when there is no
    CUDA device for --device cuda or no case matches."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; pass --device cpu --quick for a smoke test", file=sys.stderr)
        return None
    cases = select_cases(args.only, args.cases_on, args.profile, args.device)
    if not cases:
        print("no expressible case matches --only / --cases-on", file=sys.stderr)
        return None
    return cases


def select_cases(only: str, cases_on: str | None, profile: str | None, device: str):
    """Expressible validation cases whose id contains `only`, on `cases_on` ('all': any hardware;
    default: `profile`'s, or any when no profile is named or on CPU)."""
    from xplan.app.validation import load_cases, load_published

    cases, _ = load_cases(None, load_published())
    hardware = cases_on or (None if profile is None or device == "cpu" else profile)
    return [c for c in cases if only in c.id and (hardware in (None, "all") or c.hardware == hardware)]


def _operands(m: int, n: int, k: int, groups: int, dtype, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(groups, m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(groups, k, n, generator=gen).to(device=device, dtype=dtype)
    return a, b


def _runner(m: int, n: int, k: int, groups: int, precision: str, device: str):
    """A zero-argument callable that issues the GEMM once."""
    import torch

    if device == "cpu":
        a, b = _operands(m, n, k, groups, torch.float32, device)
        return (lambda: torch.mm(a[0], b[0])) if groups == 1 else (lambda: torch.bmm(a, b))
    if precision == "fp8":
        a, b = _operands(m, n, k, groups, torch.bfloat16, device)
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.transpose(1, 2).contiguous().to(torch.float8_e4m3fn).transpose(1, 2)  # column-major
        one = torch.ones((), device=device)

        def fp8():
            for g in range(groups):
                torch._scaled_mm(a8[g], b8[g], scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return fp8
    a, b = _operands(m, n, k, groups, torch.bfloat16, device)
    return (lambda: torch.mm(a[0], b[0])) if groups == 1 else (lambda: torch.bmm(a, b))


def _loop_runner(m: int, n: int, k: int, groups: int, device: str):
    """The groups as one torch.mm call each (a per-expert loop: launch-bound when GEMMs are small)."""
    import torch

    a, b = _operands(m, n, k, groups, torch.bfloat16, device)

    def loop():
        for g in range(groups):
            torch.mm(a[g], b[g])
    return loop


def sustained_seconds(fn, window: float, device: str) -> float:
    """Mean seconds per call over a timed window of back-to-back calls (after a short warm-up)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    while time.perf_counter() - start < min(0.2, window / 4):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            fn()
        calls += 4
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= window:
            return elapsed / calls


def settle(seconds: float, device: str) -> None:
    """Run a large bf16 GEMM until the clock has settled at the power cap."""
    if device != "cuda" or seconds <= 0:
        return
    fn = _runner(8192, 8192, 8192, 1, "bf16", device)
    sustained_seconds(fn, seconds, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_arguments(parser)
    parser.add_argument("--top", type=int, default=3, help="GEMM shapes per case (by predicted time)")
    parser.add_argument("--window", type=float, default=0.5, help="timed seconds per shape")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of 8192^3 GEMMs first (GPU)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: shapes / 16 per dim, short windows")
    args = parser.parse_args(argv)
    from xplan.cost_models.kernels import gemm_time
    from xplan.hw_profiles import load_profile

    cases = cases_from_args(args)
    if cases is None:
        return 2
    shapes: dict[tuple, list[tuple[str, float]]] = defaultdict(list)
    for case in cases:
        for m, n, k, groups, precision, share in case_gemms(case, args.top):
            if args.quick:
                m, n, k, groups = max(1, m // 16), max(1, n // 16), max(1, k // 16), min(groups, 4)
            shapes[(m, n, k, groups, precision, case.hardware)].append((case.id, share))
    settle(args.settle, args.device)
    rows = []
    print(f"{'m x n x k':>22} {'groups':>6} {'dtype':>5} {'profile':>16} {'pred TFLOPS':>11} {'meas TFLOPS':>11} "
          f"{'meas/pred':>9}  cases")
    for (m, n, k, groups, precision, case_hw), users in sorted(shapes.items()):
        dtype = "fp32" if args.device == "cpu" else precision
        profile = load_profile(args.profile or ("cpu" if args.device == "cpu" else case_hw))
        flops = 2.0 * m * n * k * groups
        predicted = flops / gemm_time(profile, m, n, k, dtype, groups)
        window = 0.05 if args.quick else args.window
        try:
            measured = flops / sustained_seconds(_runner(m, n, k, groups, dtype, args.device), window, args.device)
        except RuntimeError as err:  # e.g. fp8 kernels want dimensions in multiples of 16
            print(f"{f'{m} x {n} x {k}':>22} {groups:>6} {dtype:>5}  refused: {str(err).splitlines()[0][:100]}")
            continue
        rows.append({"m": m, "n": n, "k": k, "groups": groups, "dtype": dtype, "profile": profile.name,
                     "predicted_tflops": predicted / 1e12, "measured_tflops": measured / 1e12,
                     "ratio": measured / predicted, "cases": [{"id": c, "share": s} for c, s in users]})
        names = ", ".join(f"{c} ({s:.0%})" for c, s in users)
        if groups > 1 and dtype == "bf16":  # also as a per-expert loop (what some MoE stacks issue)
            loop = flops / sustained_seconds(_loop_runner(m, n, k, groups, args.device), window, args.device)
            rows[-1]["measured_loop_tflops"] = loop / 1e12
            names += f"  [per-group loop: {loop / 1e12:.1f} TFLOPS]"
        if args.json:  # after every shape: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        print(f"{f'{m} x {n} x {k}':>22} {groups:>6} {dtype:>5} {profile.name:>16} {predicted / 1e12:>11.1f} "
              f"{measured / 1e12:>11.1f} {measured / predicted:>9.2f}  {names}", flush=True)
    print("\nper case: share-weighted measured/predicted over its timed shapes (share of its GEMM time covered)")
    per_case: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        for user in row["cases"]:
            per_case[user["id"]].append((user["share"], row["ratio"]))
    for cid, parts in per_case.items():
        covered = sum(s for s, _ in parts)
        print(f"  {cid:52s} {sum(s * r for s, r in parts) / covered:5.2f}  ({covered:.0%})")
    print(f"median measured/predicted over {len(rows)} shapes: {statistics.median(r['ratio'] for r in rows):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
