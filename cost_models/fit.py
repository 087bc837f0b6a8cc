"""Fitting a profile's constants to measurements by inverting the cost formulas of
``cost_models.kernels``: pure functions of measured records (``xplan.hw_profiles.calibrate``
measures them; ``benchmarks/fit_profile.py`` reads a lent GPU's stored runs).

The fits minimise relative (or log) errors: a profile should be as wrong on a small kernel as on
a large one, not right on the large ones only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from xplan.errors import InputError
from xplan.hw_profiles.calibrate import AttentionResult, Fitted, MatmulResult
from xplan.hw_profiles.schema import COLLECTIVES, Profile

from .kernels import collective_terms, gemm_bytes, gemm_flops, gemm_time, roofline_time


# ---------------------------------------------------------------------- calibration (xplan calibrate)
def fit_calibration(data: dict[str, Any], cpu: bool) -> Fitted:
    """The constants of a calibrated profile fitted to ``measure``'s data: per-kernel overhead,
    memory bandwidth, GEMM peaks per dtype, attention efficiency per pass and collectives.
    ``cpu``: attention is then fitted against the fp32 peak (the dtype CPU runs use)."""
    # per-kernel overhead: the tiny decoder block's seconds per counted kernel (median over sizes)
    overhead = statistics.median(r["seconds_per_kernel"] for r in data["overhead"]
                                 if r.get("kind", "block") == "block")
    mem_bw = fit_bandwidth(data["elementwise"])
    # GEMMs: per dtype, the peak that fits the sweep with the roofline's bytes and overhead
    gemms = [MatmulResult(**r) for r in data["gemm"]]
    peaks: dict[str, float | None] = {"fp8": None}
    for d in ("fp32", "bf16"):
        rs = [r for r in gemms if r.dtype == d]
        peaks[d] = fit_gemm_peak(rs, mem_bw, overhead) if rs else None
    if peaks["bf16"] is None:
        raise InputError("calibration measured no bf16 GEMMs; the profile needs a bf16 peak")
    # attention: efficiency vs the dtype peak of the runs this device makes (fp32 on CPU)
    att_dtype = "fp32" if cpu and peaks.get("fp32") else "bf16"
    att = [AttentionResult(**r) for r in data["attention"] if r["dtype"] == att_dtype]
    peak_att = peaks[att_dtype]
    seqs = [r.seq_len for r in att]

    def eff(flops: float, t: float) -> float:
        return flops / (max(t - overhead, t * 0.05) * peak_att)

    forward = fit_saturation(seqs, [eff(r.fwd_flops, r.fwd_seconds) for r in att], cap=1.0)
    backward = fit_saturation(seqs, [eff(2 * r.fwd_flops, r.bwd_seconds) for r in att], cap=1.0)
    coll = data.get("collectives") or []
    return Fitted(kernel_overhead_s=overhead, memory_bw=mem_bw, peak_flops=peaks, attention_dtype=att_dtype,
                  attention={"forward": forward, "backward": backward},
                  collectives=fit_collectives(coll) if coll else None)


def fit_gemm_peak(results: Sequence[MatmulResult], bw: float, overhead: float) -> float:
    """FLOP/s that makes the GEMM roofline (max(FLOPs / peak, bytes / bw) + overhead, at
    max_fraction 1) fit the sweep best (relative least squares over a log grid from 0.2x to 1.5x
    the best shape).

    Shapes whose measured time is under 4x ``overhead`` are left out when others remain: there
    the per-kernel overhead of eager training (autograd, module code) exceeds what a bare GEMM
    loop pays per call (on accelerators the launches overlap), and they say nothing about the peak.
    """
    big = [r for r in results if r.seconds >= 4 * overhead] or list(results)
    rows = [(gemm_flops(r.m, r.n, r.k, r.groups), *gemm_bytes(r.m, r.n, r.k, r.dtype, r.groups), r.seconds)
            for r in big]
    best = max(flops / max(seconds - overhead, seconds * 0.05) for flops, _, _, seconds in rows)
    grid = [best * 0.2 * (7.5 ** (i / 400)) for i in range(401)]

    def err(peak: float) -> float:
        return sum((roofline_time(flops, peak, in_bytes, out_bytes, bw, overhead) / seconds - 1.0) ** 2
                   for flops, in_bytes, out_bytes, seconds in rows)

    return min(grid, key=err)


def fit_bandwidth(records: Sequence[dict[str, float]], overhead: float = 0.0) -> float:
    """bytes/s of ``t = overhead + bytes / bw`` fitted in log space (least squares of log(t_model /
    t)): the geometric mean of the per-size bandwidths, so cache-resident and DRAM-sized points
    weigh alike."""
    logs = [math.log(r["bytes"] / max(r["seconds"] - overhead, r["seconds"] * 0.05)) for r in records]
    return math.exp(sum(logs) / len(logs))


def fit_saturation(xs: Sequence[float], effs: Sequence[float], cap: float = math.inf) -> tuple[float, float]:
    """Fit ``eff = a * x / (x + h)`` with ``a <= cap`` (relative least squares over a grid of h from
    0 to 8x the largest x); returns (a, h)."""
    best: tuple[float, float, float] | None = None
    top = max(xs)
    for h in (top * i / 400 for i in range(0, 3201)):
        w = [x / (x + h) if x + h > 0 else 1.0 for x in xs]
        a = (sum(wi / e for wi, e in zip(w, effs, strict=True))
             / sum((wi / e) ** 2 for wi, e in zip(w, effs, strict=True)))
        a = min(a, cap)
        err = sum(((a * wi - e) / e) ** 2 for wi, e in zip(w, effs, strict=True))
        if best is None or err < best[0]:
            best = (err, a, h)
    assert best is not None
    return best[1], best[2]


def fit_collectives(records: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Alpha-beta fits (``kernels.alpha_beta_time``), relative least squares (rows weighted by 1/t).

    Per kind: t = steps x alpha_k + traffic / B_k. Shared: one alpha for all kinds with a B per
    kind (the profile has one latency per level). Returns {"per_kind": {k: (alpha, B)},
    "latency_s": alpha, "busbw": {k: B}}.
    """
    kinds = [k for k in COLLECTIVES if any(r["kind"] == k for r in records)]
    per_kind = {}
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        a, b = [], []
        for r in rows:
            steps, traffic = collective_terms(kind, r["bytes"], int(r["world"]))
            a.append([steps / r["seconds"], traffic / r["seconds"]])
            b.append(1.0)
        alpha, inv_bw = _solve(a, b) if len(rows) > 1 else (0.0, 0.0)
        if inv_bw <= 0 or alpha < 0:  # latency-dominated (or one size): alpha 0, B from the largest message
            big = max(rows, key=lambda r: r["bytes"])
            alpha, inv_bw = 0.0, big["seconds"] / collective_terms(kind, big["bytes"], int(big["world"]))[1]
        per_kind[kind] = (alpha, 1.0 / inv_bw)
    a, b = [], []
    for r in records:
        steps, traffic = collective_terms(r["kind"], r["bytes"], int(r["world"]))
        row = [steps / r["seconds"]] + [traffic / r["seconds"] if r["kind"] == k else 0.0 for k in kinds]
        a.append(row)
        b.append(1.0)
    sol = _solve(a, b)
    alpha = max(sol[0], 0.0)
    busbw = {}
    for i, kind in enumerate(kinds):
        inv = sol[i + 1]
        if inv <= 0:  # latency-dominated everywhere: bandwidth from the largest message alone
            big = max((r for r in records if r["kind"] == kind), key=lambda r: r["bytes"])
            steps, traffic = collective_terms(kind, big["bytes"], int(big["world"]))
            inv = max(big["seconds"] - steps * alpha, big["seconds"] * 0.05) / traffic
        busbw[kind] = 1.0 / inv
    return {"per_kind": per_kind, "latency_s": alpha, "busbw": busbw}


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Least squares ``a x ~ b`` (small, dense; float64)."""
    sol = torch.linalg.lstsq(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)[:, None])
    return [float(v) for v in sol.solution[:, 0]]


# ---------------------------------------------------------------------- a lent GPU's runs (fit_profile.py)
def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean(log v)): the log-space least-squares fit of one constant factor."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def with_gemm_fraction(profile: Profile, dtype: str, fraction: float) -> Profile:
    """A copy of ``profile`` whose ``compute.gemm.max_fraction.<dtype>`` is ``fraction`` (profiles
    are frozen)."""
    gemm = profile.compute.gemm
    fractions = gemm.max_fraction.model_copy(update={dtype: fraction})
    compute = profile.compute.model_copy(update={"gemm": gemm.model_copy(update={"max_fraction": fractions})})
    return profile.model_copy(update={"compute": compute})


def fit_gemm_fraction(profile: Profile, dtype: str, points: Sequence[dict[str, Any]]) -> tuple[float, float, float]:
    """``compute.gemm.max_fraction`` of ``dtype`` (0.400..0.899 in steps of 0.001) that fits
    ``gemm_time`` best to measured GEMMs (least squares on log time), the profile's other
    constants kept. ``points``: dicts with m, n, k, groups and ``measured_tflops``. Returns
    (fraction, max |log error|, median log error)."""
    import numpy as np  # the grid as the stored fits were made (numpy's float steps)

    best = None
    for fraction in np.arange(0.40, 0.90, 0.001):
        trial = with_gemm_fraction(profile, dtype, float(fraction))
        err = [math.log(gemm_time(trial, r["m"], r["n"], r["k"], dtype, r["groups"])
                        * r["measured_tflops"] * 1e12 / gemm_flops(r["m"], r["n"], r["k"], r["groups"]))
               for r in points]
        score = sum(e * e for e in err)
        if best is None or score < best[0]:
            best = (score, float(fraction), max(abs(e) for e in err), sorted(err)[len(err) // 2])
    return best[1:]


def fit_attention_pass(points: Sequence[tuple[float, float, float]], peak: float) -> tuple[float, float, float, float]:
    """(max_fraction, half_seq, tail_us, max |log error|) of one attention pass,
    ``time = flops / (peak x max_fraction x s / (s + half_seq)) + tail``, over [(model FLOPs,
    seq_len, seconds)]: a grid over half_seq (0..2000 by 10) and tail (0..300 us by 2), with the
    log-space best max_fraction for each."""
    import numpy as np  # vectorised over the points; the grid as the stored fits were made

    flops = np.array([p[0] for p in points])
    seqs = np.array([p[1] for p in points], dtype=float)
    times = np.array([p[2] for p in points])
    best = None
    for half in np.arange(0.0, 2001.0, 10.0):
        for tail in np.arange(0.0, 301e-6, 2e-6):
            work = times - tail
            if (work <= 0).any():
                continue
            # log-space best max_fraction for this (half, tail): geometric mean of the implied values
            implied = flops * (seqs + half) / (seqs * peak * work)
            frac = float(np.exp(np.log(implied).mean()))
            model = flops * (seqs + half) / (seqs * peak * frac) + tail
            err = np.log(model / times)
            score = float((err ** 2).sum())
            if best is None or score < best[0]:
                best = (score, frac, float(half), float(tail * 1e6), float(np.abs(err).max()))
    return best[1:]
