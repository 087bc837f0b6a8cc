"""`xplan calibrate`: a reduced sweep yields a valid profile the estimator accepts; the fits recover
known parameters; the CLI's -o / --json / default YAML output and its bad-input exits."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import yaml

from xplan.cli import main
from xplan.cost_models.kernels import collective_bandwidth
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
    result = cal.calibrate(processes=1, threads=1, sweep=TINY_SWEEP, name="cpu-test",
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
    for dtype in ("fp32", "bf16"):
        assert 1e-3 < getattr(p.compute.peak_tflops, dtype) < 1e4  # 1 GFLOPS .. 10 PFLOPS
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
        r = cal.MatmulResult(m, n, k, "fp32", 1.0)
        rs.append(cal.MatmulResult(m, n, k, "fp32", max(r.flops / peak, r.nbytes / bw) + t0))
    assert cal.fit_gemm_peak(rs, bw, t0) == pytest.approx(peak, rel=0.01)
    assert cal.fit_bandwidth([{"bytes": 1e6, "seconds": 1e-4}, {"bytes": 1e6, "seconds": 4e-4}]) == pytest.approx(5e9)
    alpha, busbw = 50e-6, {"all_gather": 1e9, "reduce_scatter": 8e8, "all_reduce": 2e9, "all_to_all": 5e8,
                           "p2p": 3e9}
    records = []
    for kind in COLLECTIVES:
        for nbytes in (4e3, 1e6, 3e7):
            steps, traffic = cal.collective_terms(kind, nbytes, 2)
            records.append({"kind": kind, "bytes": nbytes, "seconds": steps * alpha + traffic / busbw[kind],
                            "world": 2.0})
    fit = cal.fit_collectives(records)
    assert fit["latency_s"] == pytest.approx(alpha, rel=1e-6)
    for kind in COLLECTIVES:
        assert fit["busbw"][kind] == pytest.approx(busbw[kind], rel=1e-6)
        assert fit["per_kind"][kind][0] == pytest.approx(alpha, rel=1e-6)


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
    monkeypatch.setattr(cal, "calibrate", lambda **kwargs: calibration)
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
