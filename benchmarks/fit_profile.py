"""Fit a GPU profile's GEMM ceiling and attention constants to gemm_shapes / attention_shapes output.

Reads the JSON that `gemm_shapes.py` and `attention_shapes.py` write on a lent GPU and prints the
constants of the profile's own cost functions that best fit those timings (least squares on the
log of the time), with the fit's error per shape, so that a profile's numbers can cite a
measurement and the command that reproduces it:

    python benchmarks/fit_profile.py --profile h200 \\
        --gemm benchmarks/results/h200-2026-11-28/gemm_shapes.json \\
        --attention benchmarks/results/h200-2026-11-28/attention_shapes.json

GEMM: `compute.gemm.max_fraction` per dtype, other gemm constants as the profile has them, over the
shapes whose dimensions are multiples of 8; `compute.gemm.unaligned` (odd / even) from the bf16
shapes with a width off a multiple of 8 (cuBLAS leaves its tensor-core fast path for them).
Attention (model FLOPs: causal half, backward 2 x forward): per pass, `max_fraction`, `half_seq`
and `tail_us` of `time = F / (peak x max_fraction x s / (s + half_seq)) + tail + launch` to the cuDNN
kernel (`flash`), and one `sdpa_fraction` (time / sdpa_fraction) to FlashAttention-2 (`sdpa`).
Host: `host.dispatch_us` to the step times gpu_check.py measured with xplan's runtime (small models,
where the host's issue rate binds), e.g. `--gpu-check benchmarks/results/*/gpu_check.txt`.

The fitting math (inverting the cost formulas of `xplan.cost_models.kernels`) is in
`xplan.cost_models.fit`; this script reads the stored runs and prints the fits.
"""

from __future__ import annotations

import argparse
import json
import math


def fit_dispatch(check_logs: list[str]) -> None:
    """Fit `host.dispatch_us` to gpu_check.py's measured step times (its eager-kernel plans at world
    size 1): one value over every (model, GPU) row of the logs, each priced with its own profile."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import yaml
    from gpu_check import MODELS, price

    from xplan.hw_profiles.loader import PROFILE_DIR

    rows = []  # (model, profile name, measured step s)
    for log in check_logs:
        seen = set()  # a model's first row is priced with the run's own profile, --compare rows follow
        for line in Path(log).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] in MODELS and parts[0] not in seen:
                seen.add(parts[0])
                rows.append((parts[0], parts[1], float(parts[3])))
    kernels = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": "eager"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (config, _) in MODELS.items():
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps(config))

        def predicted(model: str, profile: str, dispatch_us: float) -> float:
            data = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text())
            data["host"]["dispatch_us"] = float(dispatch_us)
            data["sources"]["host.dispatch_us"] = "trial value of fit_profile.py"
            path = root / f"{profile}-{dispatch_us:.1f}.yaml"  # a new path: loaded profiles are cached
            path.write_text(yaml.safe_dump(data))
            return price(root / model, str(path), MODELS[model][1], kernels, "bf16").step_time_s

        def best_of(values, best=None):
            for dispatch_us in values:
                err = [math.log(predicted(m, p, dispatch_us) / t) for m, p, t in rows]
                score = sum(e * e for e in err)
                if best is None or score < best[0]:
                    best = (score, float(dispatch_us), err)
            return best

        best = best_of(np.arange(0.0, 151.0, 5.0))  # coarse, then 0.5 us around the best
        best = best_of(np.arange(max(0.0, best[1] - 5), best[1] + 5.5, 0.5), best)
    ratios = ", ".join(f"{m}@{p} {math.exp(e):.2f}" for (m, p, _), e in zip(rows, best[2], strict=True))
    print(f"host dispatch_us {best[1]:.1f} over {len(rows)} gpu_check runs; predicted / measured step: {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="the profile whose other constants the fit keeps")
    parser.add_argument("--gemm", help="gemm_shapes.py --json output")
    parser.add_argument("--attention", help="attention_shapes.py --json output")
    parser.add_argument("--gpu-check", nargs="+", help="gpu_check.py logs (their table rows) to fit host.dispatch_us")
    args = parser.parse_args(argv)
    if args.gpu_check:
        fit_dispatch(args.gpu_check)
    from xplan.cost_models.fit import fit_attention_pass, fit_gemm_fraction, geometric_mean
    from xplan.cost_models.kernels import causal_attention_flops, width_alignment
    from xplan.hw_profiles import load_profile

    profile = load_profile(args.profile)
    if args.gemm:
        everything = json.load(open(args.gemm))
        for name in ("odd", "even"):
            pts = [r for r in everything if r["dtype"] == "bf16" and r["m"] % 8 == 0
                   and width_alignment(r["n"], r["k"]) == name]
            if pts:
                fraction = geometric_mean([r["measured_tflops"] * 1e12 / profile.peak_flops("bf16") for r in pts])
                print(f"gemm unaligned bf16 {name}: {fraction:.3f} of the peak over "
                      f"{len(pts)} shapes ({min(r['measured_tflops'] for r in pts):.0f}.."
                      f"{max(r['measured_tflops'] for r in pts):.0f} TFLOPS)")
        rows = [r for r in everything if all(r[d] % 8 == 0 for d in ("m", "n", "k"))]
        for dtype in sorted({r["dtype"] for r in rows}):
            pts = [r for r in rows if r["dtype"] == dtype]
            old = getattr(profile.compute.gemm.max_fraction, dtype)
            fraction, max_err, median_err = fit_gemm_fraction(profile, dtype, pts)
            print(f"gemm {dtype}: max_fraction {fraction:.3f} (profile {old}) over {len(pts)} aligned shapes; "
                  f"max |time error| {math.exp(max_err) - 1:.1%}, median error {math.exp(median_err) - 1:+.1%}")
    if args.attention:
        rows = json.load(open(args.attention))
        peak = profile.peak_flops("bf16")
        launch = profile.compute.gemm.overhead_us * 1e-6  # op_time adds it to every kernel
        for i, (name, key) in enumerate((("forward", "fwd"), ("backward", "bwd"))):
            pts = [(causal_attention_flops(*r["shape"], backward=i == 1), r["shape"][2],
                    r["measured_s"]["cudnn"][key] - launch) for r in rows if "cudnn" in r["measured_s"]]
            frac, half, tail, err = fit_attention_pass(pts, peak)
            print(f"attention {name} (cuDNN): max_fraction {frac:.3f}, half_seq {half:.0f}, tail_us {tail:.0f}; "
                  f"max |time error| {math.exp(err) - 1:.1%} over {len(pts)} shapes")
        ratios = [r["measured_s"]["cudnn"][p] / r["measured_s"]["flash"][p]
                  for r in rows if {"cudnn", "flash"} <= set(r["measured_s"]) for p in ("fwd", "bwd")]
        frac = geometric_mean(ratios)
        print(f"attention sdpa_fraction (FlashAttention-2 time vs cuDNN): {frac:.3f}; per shape and pass "
              f"{min(ratios):.2f}..{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
