"""`xplan calibrate`: a reduced sweep yields a valid profile the estimator accepts; the fits recover
known parameters; the CLI's -o / --json / default YAML output and its bad-input exits."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import yaml

from xplan.cli import calibrate_cmd, main
from xplan.cost_models import fit
from xplan.cost_models.kernels import collective_bandwidth, collective_terms
from xplan.hw_profiles import COLLECTIVES, load_profile, profile_from_dict, profile_from_yaml, save_profile
from xplan.hw_profiles import calibrate as cal

TINY_SWEEP = cal.Sweep(
    gemm_shapes=((32, 32, 32), (128, 128, 128), (64, 256, 128)),
    gemm_layouts=("nt", "tn"),
    grouped_shapes=((4, 16, 32, 32),),
    elementwise_mib=(0.25, 2),
    copy_mib=4,
    overhead_numels=(16, 256),
    attention_seqs=(32, 64, 128),
    attention_shape=(1, 2, 16),
    collective_kib=(4, 256),
    min_time=0.002,
    repeats=2,
)
TINY_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def calibration():
    """One real calibration: compute in this process (1 thread), gloo collectives between 2."""
    seen = []
    result = calibrate_cmd.run_calibration(processes=1, threads=1, sweep=TINY_SWEEP, name="cpu-test",
                                           progress=lambda done, total, label: seen.append((done, total, label)))
    result.progress_seen = seen
    return result


def xplan(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------- the measured profile
def test_profile_loads_and_round_trips(calibration, tmp_path):
    p = calibration.profile
    assert p.name == "cpu-test" and p.device.kind == "cpu"
    path = save_profile(p, tmp_path / "cal.yaml", header=calibration.header)
    assert load_profile(path) == p
    assert profile_from_yaml(calibration.yaml_text()) == p
    assert profile_from_dict(p.to_dict()) == p
    assert calibration.yaml_text().startswith("# Measured on this machine by `xplan calibrate`")


def test_numbers_are_positive_plausible_and_sourced(calibration):
    p = calibration.profile
    # 0.1 GFLOPS .. 10 PFLOPS: a CPU without bf16 units emulates bf16 GEMMs at ~1 GFLOPS, and the
    # fixture's tiny, short sweep on 2 shared cores measured half that under load (0.46 GFLOPS).
    for dtype in ("fp32", "bf16"):
        assert 1e-4 < getattr(p.compute.peak_tflops, dtype) < 1e4
    assert p.compute.peak_tflops.fp8 is None and p.compute.gemm.max_fraction.fp8 is None
    assert 0.05 < p.compute.gemm.overhead_us < 10_000
    assert 0.1e9 < p.hbm_bandwidth() < 20e12
    assert 0.1e9 < p.host_bandwidth() < 20e12
    assert p.memory.hbm_gib > 0 and p.host.memory_gib > 0
    for att in (p.compute.attention.forward, p.compute.attention.backward):
        assert 0 < att.max_fraction <= 1 and att.half_seq >= 0
    level = p.levels[0]
    assert level.devices is None and 0 <= level.latency_us < 100_000
    for kind in COLLECTIVES:
        assert 0 < getattr(level.fraction, kind) <= 1
        assert collective_bandwidth(p, 0, kind) > 1e6
    # every measured number says where it came from
    for key in ("compute.peak_tflops", "compute.gemm.overhead_us", "compute.attention", "memory.hbm_tbps",
                "host.link_gbps", "interconnect.levels[0].latency_us", "interconnect.levels[0].fraction"):
        assert p.sources[key].startswith("measured by xplan calibrate on "), key
        assert calibration.profile.description in p.description
    assert "same memory" in p.sources["host.link_gbps"]  # CPU: host and device are one memory
    raw = calibration.measurements
    assert {r["kind"] for r in raw["collectives"]} == set(COLLECTIVES)
    assert any(r["groups"] > 1 for r in raw["gemm"])  # grouped GEMMs measured
    assert all(r["seconds"] > 0 for r in raw["gemm"])


def test_progress_reports_every_step(calibration):
    seen = calibration.progress_seen
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 5
    assert [s[0] for s in seen] == list(range(len(seen)))


def test_estimator_accepts_the_profile(calibration, tmp_path):
    from xplan.layout import Layout
    from xplan.planner.pricing import Workload, price

    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_MOE))
    path = save_profile(calibration.profile, tmp_path / "cal.yaml")
    kernels = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": "eager"}
    for devices in (1, 2):
        layout = Layout(devices=devices, fsdp=devices, precision="fp32", kernels=kernels)
        est = price(Workload(str(model), str(path), 32, 4), layout)
        assert est.fits and 0 < est.step_time_s < 60 and math.isfinite(est.mfu)
        assert est.time["compute"] > 0
        if devices == 2:
            assert est.time["fsdp_exposed"] > 0  # the measured collectives price the all-gathers


# ---------------------------------------------------------------------- fits (synthetic, exact)
def test_fits_recover_known_parameters():
    peak, bw, t0 = 2e11, 5e10, 4e-6
    rs = []
    for m, n, k in ((16, 16, 16), (64, 256, 128), (512, 512, 512), (1024, 2048, 512)):
        flops, nbytes = 2 * m * n * k, (m * k + k * n + m * n) * 4
        rs.append(cal.MatmulResult(m, n, k, "fp32", max(flops / peak, nbytes / bw) + t0))
    assert fit.fit_gemm_peak(rs, bw, t0) == pytest.approx(peak, rel=0.01)
    assert fit.fit_bandwidth([{"bytes": 1e6, "seconds": 1e-4}, {"bytes": 1e6, "seconds": 4e-4}]) == pytest.approx(5e9)
    xs = [128, 256, 512, 1024, 4096]
    a, h = fit.fit_saturation(xs, [0.6 * x / (x + 256) for x in xs])
    assert a == pytest.approx(0.6, rel=0.02) and h == pytest.approx(256, rel=0.05)
    alpha, busbw = 50e-6, {"all_gather": 1e9, "reduce_scatter": 8e8, "all_reduce": 2e9, "all_to_all": 5e8,
                           "p2p": 3e9}
    records = []
    for kind in COLLECTIVES:
        for nbytes in (4e3, 1e6, 3e7):
            steps, traffic = collective_terms(kind, nbytes, 2)
            records.append({"kind": kind, "bytes": nbytes, "seconds": steps * alpha + traffic / busbw[kind],
                            "world": 2.0})
    got = fit.fit_collectives(records)
    assert got["latency_s"] == pytest.approx(alpha, rel=1e-6)
    for kind in COLLECTIVES:
        assert got["busbw"][kind] == pytest.approx(busbw[kind], rel=1e-6)
        assert got["per_kind"][kind][0] == pytest.approx(alpha, rel=1e-6)


def test_gpu_run_fits_recover_known_parameters():
    """The fits benchmarks/fit_profile.py prints, on synthetic runs made with known constants."""
    from xplan.cost_models.kernels import gemm_flops, gemm_time

    h100 = load_profile("h100")
    truth = fit.with_gemm_fraction(h100, "bf16", 0.62)
    points = []
    for m, n, k in ((4096, 4096, 4096), (8192, 1536, 4096), (1024, 7168, 2048), (16384, 4096, 512)):
        t = gemm_time(truth, m, n, k, "bf16")
        points.append({"m": m, "n": n, "k": k, "groups": 1, "measured_tflops": gemm_flops(m, n, k) / t / 1e12})
    fraction, max_err, median_err = fit.fit_gemm_fraction(h100, "bf16", points)
    assert fraction == pytest.approx(0.62, abs=1e-6) and max_err < 1e-6 and abs(median_err) < 1e-6
    # attention: 0.6 of a 1 PFLOP/s peak at half_seq 400 with a 30 us tail, on the grid the fit searches
    peak, points = 1e15, []
    for s in (1024, 2048, 4096, 8192, 16384):
        flops = 4 * 16 * s * s * 128 / 2
        points.append((flops, s, flops / (peak * 0.6 * s / (s + 400)) + 30e-6))
    frac, half, tail_us, err = fit.fit_attention_pass(points, peak)
    assert (frac, half, tail_us) == (pytest.approx(0.6, rel=1e-6), 400.0, pytest.approx(30.0))
    assert err < 1e-6
    assert fit.geometric_mean([0.5, 2.0, 1.0]) == pytest.approx(1.0)


def test_fit_calibration_needs_a_bf16_gemm():
    from xplan.errors import InputError

    data = {"overhead": [{"kind": "block", "seconds_per_kernel": 1e-5}],
            "elementwise": [{"bytes": 1e6, "seconds": 1e-4}],
            "gemm": [{"m": 64, "n": 64, "k": 64, "dtype": "fp32", "seconds": 1e-4}], "attention": []}
    with pytest.raises(InputError, match="no bf16 GEMMs"):
        fit.fit_calibration(data, cpu=True)


def test_measure_helpers_smoke():
    rs = cal.measure_matmul([(8, 8, 8), (64, 32, 16)], "fp32", min_time=0.001)
    assert [(r.m, r.n, r.k) for r in rs] == [(8, 8, 8), (64, 32, 16)]
    assert all(r.seconds > 0 and r.tflops > 0 for r in rs)
    assert cal.measure_copy_bandwidth(2**20, min_time=0.001, allocations=1) > 0
    att = cal.measure_attention([16], heads=2, head_dim=8, dtype="fp32", min_time=0.001)
    assert att[0].fwd_tflops > 0 and att[0].bwd_tflops > 0


def test_significant_digits():
    from xplan.hw_profiles.calibrate.build import _sig

    assert math.isclose(_sig(0.0123456), 0.01235)
    assert _sig(0.0) == 0.0 and _sig(123456.0) == 123500.0


def test_timer_reports_median_and_spread():
    t = cal.time_fn(lambda: sum(range(100)), min_time=0.001, repeats=3)
    assert 0 < t.low <= t.median <= t.high and t.spread >= 0


# ---------------------------------------------------------------------- CLI
def test_cli_writes_output_and_json(tmp_path):
    out = tmp_path / "cpu-cal.yaml"
    code, stdout, err = xplan("calibrate", "--quick", "--processes", "2", "--name", "cpu-cli", "-o", out, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["output"] == str(out)
    profile = load_profile(out)
    assert profile == profile_from_dict(data["profile"]) and profile.name == "cpu-cli"
    assert data["summary"]["processes"] == 2 and data["summary"]["peak_tflops"]["fp32"] > 0
    assert out.read_text().startswith("# Measured on this machine by `xplan calibrate")
    assert "2 processes" in profile.sources["compute.peak_tflops"]


def test_cli_prints_yaml_by_default(calibration, monkeypatch):
    monkeypatch.setattr(calibrate_cmd, "run_calibration", lambda **kwargs: calibration)
    code, stdout, err = xplan("calibrate")
    assert code == 0, err
    assert stdout.startswith("# Measured")
    assert profile_from_yaml(stdout) == calibration.profile
    assert yaml.safe_load(stdout)["name"] == "cpu-test"


@pytest.mark.parametrize("args, words", [
    (("--processes", "0"), "--processes"),
    (("--threads", "0"), "--threads"),
    (("--device", "tpu"), "--device"),
    (("--name", "bad name"), "--name"),
    (("-o", "/nonexistent-dir/x.yaml"), "folder does not exist"),
])
def test_cli_bad_input_exits_2(args, words):
    code, _, err = xplan("calibrate", *args)
    assert code == 2
    assert words in " ".join(err.split())  # rich wraps long lines
