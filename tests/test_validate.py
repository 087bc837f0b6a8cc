"""`xplan validate`: the published-results mapping is complete and well-formed, errors are computed
right, and the harness and CLI run (on a small subset; the accuracy thresholds are not asserted here)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from xplan.app.validation import (
    CASES_PATH,
    METRICS,
    PUBLISHED_PATH,
    flops_per_token,
    load_cases,
    load_published,
    published_field,
    run_validation,
)
from xplan.cli import main
from xplan.cost_models import estimate
from xplan.hw_profiles import load_profile, profile_names
from xplan.layout import check_layout, layout_from_dict
from xplan.planner.trace import trace_model
from xplan.runtime import load_config
from xplan.runtime.models import model_config_from_dict, preset_names

SHARED_PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "published_results.yaml"
EXTENDED_ASCEND = CASES_PATH.parent / "extended" / "ascend_910b.yaml"
# (published rows, cases): the shipped set, and the extended Ascend set (one file holding both)
SETS = pytest.mark.parametrize("published_path, cases_path", [(PUBLISHED_PATH, CASES_PATH),
                                                               (EXTENDED_ASCEND, EXTENDED_ASCEND)],
                               ids=["shipped", "ascend_910b"])


@pytest.fixture(autouse=True)
def _trace_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPLAN_CACHE_DIR", str(tmp_path / "trace-cache"))


def _raw_cases(path: Path = CASES_PATH) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------- the mapping file
def test_published_copy_is_verbatim():
    if not SHARED_PUBLISHED.is_file():
        pytest.skip("shared reference folder not present")
    assert PUBLISHED_PATH.read_bytes() == SHARED_PUBLISHED.read_bytes()


@SETS
def test_every_published_row_has_exactly_one_case(published_path, cases_path):
    published = load_published(published_path)
    ids = [c["id"] for c in _raw_cases(cases_path)["cases"]]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert set(ids) == set(published), (f"missing: {sorted(set(published) - set(ids))}; "
                                        f"unknown: {sorted(set(ids) - set(published))}")


def test_not_expressible_rows_give_a_reason():
    for c in _raw_cases()["cases"]:
        if c.get("expressible", True) is False:
            assert isinstance(c.get("reason"), str) and len(c["reason"]) > 20, c["id"]
            assert "layout" not in c and "metrics" not in c, c["id"]


@SETS
def test_cases_reference_existing_models_profiles_and_valid_layouts(published_path, cases_path):
    cases, skipped = load_cases(cases_path, load_published(published_path))
    assert cases and (skipped or cases_path != CASES_PATH)
    profiles = set(profile_names())
    presets = set(preset_names())
    for case in cases:
        assert case.hardware in profiles, (case.id, case.hardware)
        if case.config is None:
            assert case.model in presets, (case.id, case.model)
            config = load_config(case.model)
        else:
            config = model_config_from_dict(dict(case.config), name=case.model)
        layout = layout_from_dict(case.layout)
        check_layout(layout, config, case.seq_len, case.global_batch)  # raises InputError when invalid
        assert case.metrics
        for m in case.metrics:
            assert m.metric in METRICS
            if m.metric == "tflops_per_gpu":
                assert case.flops and flops_per_token(case.flops, case.seq_len) > 0, case.id


@SETS
def test_published_figures_carry_over_unchanged(published_path, cases_path):
    published = load_published(published_path)
    cases, _ = load_cases(cases_path, published)
    for case in cases:
        for m in case.metrics:
            value = published_field(published[case.id], m.field)
            assert value is not None, (case.id, m.field)
            assert float(value) == m.published, (case.id, m.field, value, m.published)


def test_megatron_flops_match_the_dense_gpt_formula():
    L, h, V, s = 24, 2048, 131072, 4096
    spec = {"convention": "megatron", "layers": L, "hidden": h, "heads": 16, "ffn": 4 * h, "vocab": V}
    expected = 72 * L * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    assert flops_per_token(spec, s) == pytest.approx(expected, rel=1e-12)
    # MoE / GQA terms: Mixtral-like, 12 L h^2 [(1 + g/a + s/h) + (ffn/h) k 3/2 + V/(2Lh)]
    moe = {"convention": "megatron", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
           "ffn": 14336, "gated": True, "top_k": 2, "vocab": 32000}
    h = 4096
    expected = 12 * 32 * h * h * ((1 + 8 / 32 + s / h) + (14336 / h) * 2 * 1.5 + 32000 / (2 * 32 * h))
    assert flops_per_token(moe, s) == pytest.approx(expected, rel=1e-12)


def test_internevo_flops():
    spec = {"convention": "internevo", "layers": 32, "hidden": 4096, "vocab": 103168, "mlp_ratio": 8 / 3,
            "swiglu": True, "checkpoint": True}
    s, h = 2048, 4096
    expected = 4 * 32 * (24 * h * h + 4 * s * h) + 6 * h * 103168
    assert flops_per_token(spec, s) == pytest.approx(expected, rel=1e-12)
    assert flops_per_token(dict(spec, checkpoint=False), s) < expected


# ------------------------------------------------------------------------- errors, by hand
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
        "tie_word_embeddings": False}


def test_errors_and_summary_computed_by_hand(tmp_path):
    published = {"results": [
        {"id": "tiny_a", "model": "tiny", "reported": {"tokens_per_s_per_gpu": 1000.0, "memory_gib": 2.0}},
        {"id": "tiny_b", "model": "tiny", "reported": {"tflops": 3.0}},
        {"id": "tiny_c", "model": "tiny", "reported": {"note": "nothing to price"}},
    ]}
    layout = {"devices": 2, "fsdp": 2, "micro_batch": 1, "recompute": "none", "precision": "bf16"}
    flops = {"convention": "megatron", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128,
             "gated": True, "vocab": 256}
    cases = {"models": {"tiny": TINY}, "cases": [
        {"id": "tiny_a", "model": "tiny", "hardware": "h100", "layout": layout, "seq_len": 64, "global_batch": 4,
         "metrics": [{"metric": "tokens_per_s_per_gpu", "published": 1000.0, "field": "reported.tokens_per_s_per_gpu"},
                     {"metric": "memory_gib", "published": 2.0, "field": "reported.memory_gib"}]},
        {"id": "tiny_b", "model": "tiny", "hardware": "h100", "layout": layout, "seq_len": 64, "global_batch": 2,
         "flops": flops, "metrics": [{"metric": "tflops_per_gpu", "published": 3.0, "field": "reported.tflops"}]},
        {"id": "tiny_c", "expressible": False, "reason": "nothing to price in this hand-made row"},
    ]}
    pub_path, cases_path = tmp_path / "published.yaml", tmp_path / "cases.yaml"
    pub_path.write_text(yaml.safe_dump(published))
    cases_path.write_text(yaml.safe_dump(cases))

    report = run_validation(cache_dir=tmp_path / "cache", cases_path=cases_path, published_path=pub_path)

    config = model_config_from_dict(TINY, name="tiny")
    profile = load_profile("h100")
    trace = trace_model(config, 64, micro_batch=1, loss="full", cache_dir=tmp_path / "cache")
    lay = layout_from_dict(dict(layout, kernels={"loss": "full"}))
    est_a = estimate(trace, config, lay, profile, 4)
    est_b = estimate(trace, config, lay, profile, 2)
    tps_a, mem_a = est_a.tokens_per_s_per_device, est_a.memory.total / 2**30
    tflops_b = est_b.tokens_per_s_per_device * flops_per_token(flops, 64) / 1e12

    got = {(r.id, r.metric): r for r in report.rows}
    assert set(got) == {("tiny_a", "tokens_per_s_per_gpu"), ("tiny_a", "memory_gib"), ("tiny_b", "tflops_per_gpu")}
    for key, predicted, pub in ((("tiny_a", "tokens_per_s_per_gpu"), tps_a, 1000.0),
                                (("tiny_a", "memory_gib"), mem_a, 2.0),
                                (("tiny_b", "tflops_per_gpu"), tflops_b, 3.0)):
        row = got[key]
        assert row.predicted == pytest.approx(predicted, rel=1e-12)
        assert row.published == pub
        assert row.error == pytest.approx(predicted / pub - 1, rel=1e-12, abs=1e-15)
    thr = [got[("tiny_a", "tokens_per_s_per_gpu")].error, got[("tiny_b", "tflops_per_gpu")].error]
    s = report.summary
    assert s["throughput"]["count"] == 2 and s["memory"]["count"] == 1
    assert s["throughput"]["median_abs_error"] == pytest.approx(statistics.median(abs(e) for e in thr))
    assert s["throughput"]["max_abs_error"] == pytest.approx(max(abs(e) for e in thr))
    assert s["memory"]["max_abs_error"] == pytest.approx(abs(mem_a / 2.0 - 1))
    assert [n.id for n in report.not_expressible] == ["tiny_c"]
    assert report.failed == []


# ------------------------------------------------------------------------- the harness and the CLI
def test_harness_runs_on_a_subset(tmp_path):
    seen = []
    report = run_validation(cache_dir=tmp_path / "cache", only="internlm7b",
                            progress=lambda done, total, label: seen.append((done, total)))
    ids = {r.id for r in report.rows}
    assert ids == {"internlm7b_8", "internlm7b_flops_ac"}
    assert {n.id for n in report.not_expressible} == {"internlm7b_1024", "internlm7b_1024_zero_all"}
    assert report.failed == []
    assert seen[-1] == (1, 1)  # one trace group: internlm-7b at 2048
    for r in report.rows:
        assert r.predicted > 0 and r.error == pytest.approx(r.predicted / r.published - 1)
        assert r.estimate["step_time_s"] > 0


def test_cli_json_fields(capsys):
    code = main(["validate", "--only", "internlm7b", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert {"rows", "not_expressible", "summary"} <= set(data)
    assert data["rows"]
    for row in data["rows"]:
        assert {"id", "model", "hardware", "layout", "metric", "published", "predicted", "error"} <= set(row)
        assert row["error"] == pytest.approx(row["predicted"] / row["published"] - 1)
        assert "estimate" not in row  # only with --details
    assert all({"id", "reason"} <= set(n) for n in data["not_expressible"])
    for kind in ("throughput", "memory"):
        assert {"count", "median_abs_error", "max_abs_error"} <= set(data["summary"][kind])


def test_cli_table(capsys):
    code = main(["validate", "--only", "internlm7b"])
    out = capsys.readouterr().out
    assert code == 0
    assert "internlm7b_8" in out and "median" in out and "not expressible" in out and "internlm7b_1024" in out


@pytest.mark.parametrize("width", [80, 200])
def test_cli_table_keeps_each_number_on_one_line(width, capsys, monkeypatch):
    """At 80 columns (CI logs) a case's id, model, hardware and layout stack in one cell; wide, each
    has a column. Either way every row's published, predicted and error figures sit on its first line."""
    from xplan.cli.app import console

    monkeypatch.setattr(console, "width", width)
    code = main(["validate", "--only", "xtuner_mlm", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    code = main(["validate", "--only", "xtuner_mlm"])
    out = capsys.readouterr().out
    assert code == 0 and max(len(line) for line in out.splitlines()) <= width
    assert len(rows) >= 4
    body = [line for line in out.split("throughput (tok/s")[0].splitlines() if line.startswith("│")]
    assert len(body) <= 6 * len(rows)  # a stacked case: id (up to 3 lines), model on hw, layout (up to 2)
    for row in rows:
        figures = (f"{row['published']:,.0f}", f"{row['predicted']:,.0f}", f"{row['error']:+.1%}")
        assert any(all(f in line for f in figures) for line in out.splitlines()), (figures, out)
        assert row["layout"].split()[0] in out and row["model"] in out


def test_cli_only_without_match_exits_2(capsys):
    code = main(["validate", "--only", "no-such-row-id", "--json"])
    assert code == 2
    assert "no published row id contains" in capsys.readouterr().err


def test_cli_validates_another_set(tmp_path, capsys):
    """--published / --cases point the harness at another set (the extended Ascend rows here)."""
    ext = str(EXTENDED_ASCEND)
    code = main(["validate", "--published", ext, "--cases", ext, "--only", "ms_llama2_70b", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["id"] == "ms_llama2_70b_4k_4x8" and row["published"] == 439 and row["hardware"] == "ascend-910b"
    assert main(["validate", "--published", str(tmp_path / "missing.yaml"), "--json"]) == 2
    assert "cannot read the published-results file" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "bad.yaml").write_text("cases: {not: a list}\n")
    assert main(["validate", "--cases", str(tmp_path / "bad.yaml"), "--json"]) == 2
    assert "needs a top-level `cases:` list" in " ".join(capsys.readouterr().err.split())


def test_gemm_shapes_benchmark_smoke(tmp_path, capsys):
    """benchmarks/gemm_shapes.py (the GPU check of the GEMM ceiling) runs end to end on CPU: each
    case's top GEMMs by predicted time, their shares, and a measured/predicted ratio per shape."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_shapes.py"
    spec = importlib.util.spec_from_file_location("xplan_benchmarks_gemm_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    assert module.main(["--device", "cpu", "--quick", "--only", "tt_l8b_8_fsdp_compile_fp8", "--top", "2",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["measured_tflops"] > 0 and r["ratio"] > 0 for r in rows)
    # Rank-level shapes: the token dimension is micro-batch 2 x seq 8192 (then / 16 in --quick).
    assert all(r["m"] == 2 * 8192 // 16 for r in rows)
    shares = [c["share"] for r in rows for c in r["cases"]]
    assert all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9
    assert "per case" in capsys.readouterr().out
    assert module.main(["--device", "cpu", "--quick", "--only", "no-such-case"]) == 2


def test_attention_shapes_benchmark_smoke(tmp_path, monkeypatch, capsys):
    """benchmarks/attention_shapes.py (the GPU check of the attention fit): one layer's attention
    on one rank (heads split by tp), priced forward and backward for the flash fit and SDPA, and
    timed end to end on CPU."""
    import importlib.util
    from pathlib import Path

    from xplan.app.validation import load_cases, load_published
    from xplan.cost_models.kernels import attention_time
    from xplan.hw_profiles import load_profile

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("xplan_benchmarks_attention_shapes", bench / "attention_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    case = next(c for c in load_cases(None, load_published())[0] if c.id == "mlm_gpt_7.1b")
    shape, predicted = module.case_attention(case, load_profile("h100"))
    assert shape == (1, 32 // 2, 4096, 128, 128)  # gpt-7.1b: 32 heads over tp 2, micro-batch 1
    # Causal forward model FLOPs at half of 4 b h s^2 d; SDPA (FlashAttention-2) priced slower.
    flops = 4 * 16 * 4096**2 * 128 / 2
    h100 = load_profile("h100")
    launch = h100.compute.gemm.overhead_us * 1e-6
    assert abs(predicted["flash"][0] - attention_time(h100, flops, 4096) - launch) < 1e-9
    assert predicted["sdpa"][0] > predicted["flash"][0] and predicted["flash"][1] > predicted["flash"][0]
    out = tmp_path / "rows.json"
    assert module.main(["--device", "cpu", "--quick", "--only", "mlm_gpt_7.1b", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and all(t > 0 for t in rows[0]["measured_s"]["math"].values())
    assert "pred flash" in capsys.readouterr().out
    assert module.main(["--device", "cpu", "--quick", "--only", "no-such-case"]) == 2


def test_hopper_profile_constants_reproduce_from_the_stored_gpu_measurements(capsys, monkeypatch):
    """Hopper GEMM ceilings, attention and host dispatch constants are what benchmarks/fit_profile.py fits to the
    GPU measurements kept in benchmarks/results (so each can be re-derived): h200's GEMMs from the
    H200 run, h100's and h800's from the H100 run, every Hopper attention fit from the H200 run
    (its 4k..32k sequences; the H100 run covers 4k..8k only)."""
    import importlib.util
    from pathlib import Path

    from xplan.hw_profiles import load_profile

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # fit_profile imports gpu_check's models
    spec = importlib.util.spec_from_file_location("xplan_benchmarks_fit_profile", bench / "fit_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def fitted(gpu: str, part: str) -> str:  # fitted with the measured GPU's own memory bandwidth
        path = bench / "results" / f"{gpu}-2026-11-28" / f"{part}_shapes.json"
        assert module.main(["--profile", gpu, f"--{part}", str(path)]) == 0
        return capsys.readouterr().out

    attention = fitted("h200", "attention")
    gemm = {"h200": fitted("h200", "gemm"), "h100": fitted("h100", "gemm")}
    for name, run in (("h100", "h100"), ("h800", "h100"), ("h200", "h200")):
        p = load_profile(name)
        assert f"gemm bf16: max_fraction {p.compute.gemm.max_fraction.bf16:.3f}" in gemm[run]
        assert f"gemm fp8: max_fraction {p.compute.gemm.max_fraction.fp8:.3f}" in gemm[run]
        assert f"gemm unaligned bf16 odd: {p.compute.gemm.unaligned.odd:.3f} of the peak" in gemm[run]
        assert f"gemm unaligned bf16 even: {p.compute.gemm.unaligned.even:.3f} of the peak" in gemm[run]
        for label, fit in (("forward", p.compute.attention.forward), ("backward", p.compute.attention.backward)):
            assert (f"attention {label} (cuDNN): max_fraction {fit.max_fraction:.3f}, half_seq {fit.half_seq:.0f}, "
                    f"tail_us {fit.tail_us:.0f}") in attention
        assert f"sdpa_fraction (FlashAttention-2 time vs cuDNN): {p.compute.attention.sdpa_fraction:.3f}" in attention
    # host.dispatch_us: the step times xplan's runtime took on both GPUs (gpu_check.py)
    logs = [str(bench / "results" / f"{gpu}-2026-11-28" / "gpu_check.txt") for gpu in ("h100", "h200")]
    assert module.main(["--profile", "h100", "--gpu-check", *logs]) == 0
    dispatch = capsys.readouterr().out
    for name in ("h100", "h200"):
        assert f"host dispatch_us {load_profile(name).host.dispatch_us:.1f} over 4 gpu_check runs" in dispatch
