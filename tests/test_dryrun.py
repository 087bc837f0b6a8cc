"""`xplan run --dry-run`: the runtime's training step under fake tensors, peak memory vs the cost model.

- the dry run goes through the runtime's own code (meshes, EP, Ulysses, recompute, FSDP2, the
  chunked loss, clipping, AdamW: the train loop's `train_step`) and its breakdown sums to its peak;
- the application's comparison (`xplan.app.dryrun_compare`) joins it with the prediction;
- reduced depth (`layers=`) extrapolated linearly equals the full-depth run (the benchmark and the
  slice below rely on it);
- a slice of `benchmarks/memory_matrix.py` at full model size and world size: the cost model's
  per-device peak is within 3% of the measured one (row 3: the peak is in a fully recomputed MoE
  block's backward, with the EP all-to-all's gradient buffer; row 22: ZeRO-1 with EP);
- the CLI: `--json` fields, the table, exit code 2 for bad input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.trace_configs import TINY
from xplan.cli import main
from xplan.layout import Layout
from xplan.plan import make_plan, save_plan

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.03


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    yield
    torch.set_num_threads(threads)


def model_dir(tmp_path: Path, family: str, **overrides) -> Path:
    path = tmp_path / f"tiny-{family}"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY[family], **overrides}))
    return path


def tiny_plan(path: Path, devices=8, ep=2, sp=2, recompute=0.5, seq_len=64, grad_accum=2, **layout):
    lay = Layout(devices=devices, fsdp=devices, ep=ep, sp=sp, recompute=recompute, **layout)
    batch = devices // sp * lay.micro_batch * grad_accum
    return make_plan(str(path), "h800", lay, {"seq_len": seq_len, "global_batch": batch})


def xplan(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def spy(monkeypatch, module, name: str, calls: list) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_dry_run_runs_the_runtime_path_and_the_breakdown_sums_to_the_peak(tmp_path, monkeypatch):
    import xplan.runtime.distributed as D
    import xplan.runtime.train.loss as L
    import xplan.runtime.train.step as S
    from xplan.runtime.dryrun import COMPONENTS, dry_run

    P = importlib.import_module("xplan.runtime.distributed.parallelize")  # the package exports a same-named function
    calls: list[str] = []
    spy(monkeypatch, D, "parallelize", calls)
    spy(monkeypatch, D, "build_meshes", calls)
    spy(monkeypatch, D, "clip_grad_norm_", calls)
    for name in ("apply_expert_parallel", "apply_ulysses", "apply_recompute", "fully_shard"):
        spy(monkeypatch, P, name, calls)
    spy(monkeypatch, L, "token_loss_sum", calls)
    spy(monkeypatch, S, "train_step", calls)  # the train loop's own step
    # 4 layers: 1 dense + 3 MoE, recompute 0.5 = the first two blocks fully recomputed.
    plan = tiny_plan(model_dir(tmp_path, "deepseek_v3", num_hidden_layers=4), devices=8, ep=2, sp=2, recompute=0.5)
    report = dry_run(plan)

    counts = {n: calls.count(n) for n in set(calls)}
    assert counts["build_meshes"] == 1 and counts["parallelize"] == 1
    assert counts["apply_expert_parallel"] == 3  # one per MoE block
    assert counts["apply_ulysses"] == 4 and counts["apply_recompute"] == 4
    assert counts["fully_shard"] >= 4 + 3 + 1
    assert counts["train_step"] == 1 and counts["token_loss_sum"] == 2 and counts["clip_grad_norm_"] == 1
    assert report.micro_batches_run == 2 and report.world_size == 8 and report.rank == 0
    assert not report.extrapolated and report.layers_run == report.layers_total == 4

    assert report.measured_peak_bytes > 0
    assert sum(report.measured.values()) == pytest.approx(report.measured_peak_bytes, rel=1e-12)
    assert sum(report.categories.values()) == pytest.approx(report.measured_peak_bytes, rel=1e-12)
    for phase in report.phases.values():
        assert sum(phase["components"].values()) == pytest.approx(phase["peak_bytes"], rel=1e-12)
    assert set(report.phases) == {"forward", "backward", "optimizer"}
    assert report.phases[report.peak_phase]["peak_bytes"] == report.measured_peak_bytes
    assert all(v >= 0 for v in report.measured.values())
    # Model states are resident at the peak: fp32 master weights, AdamW moments (twice the weights)
    # and, in a second micro-batch, the accumulated gradients.
    m = report.measured
    assert m["parameters"] > 0 and m["optimizer"] == pytest.approx(2 * m["parameters"], rel=0.02)
    assert m["gradients"] > 0 and m["activations"] > 0
    d = report.to_dict()
    assert set(d["components"]) == set(COMPONENTS)
    assert d["measured_peak_gib"] == pytest.approx(report.measured_peak_bytes / 2**30)
    assert "predicted_peak_gib" not in d  # the comparison is the application's (xplan.app.dryrun_compare)


def test_comparison_joins_the_measurement_and_the_prediction(tmp_path, monkeypatch):
    import xplan.app.dryrun_compare as compare
    from xplan.runtime.dryrun import COMPONENTS

    predicted = dict.fromkeys(COMPONENTS, 2.0**30)  # overhead included: 1 GiB of the 9 is not compared
    monkeypatch.setattr(compare, "predicted_components", lambda plan, imbalance, reprice=False: (predicted, 9 * 2.0**30,
                                                                                                 "plan"))
    plan = tiny_plan(model_dir(tmp_path, "qwen3_moe"), devices=4, ep=2, sp=1, recompute="none", offload=("optimizer",))
    result = compare.compare_dry_run(plan)
    d = result.to_dict()
    assert d["predicted_peak_gib"] == pytest.approx(8.0) and d["predicted_total_gib"] == pytest.approx(9.0)
    assert d["ratio"] == pytest.approx(d["measured_peak_gib"] / d["predicted_peak_gib"])
    assert d["error"] == pytest.approx((8.0 - d["measured_peak_gib"]) / d["measured_peak_gib"])
    assert d["components"]["overhead"] == {"measured": 0.0, "predicted": pytest.approx(1.0)}
    # Caveats of the run, then the comparison's, then how the run was made.
    # (an h800 plan compiles its blocks; the dry run on CPU runs them eager and says so)
    assert [n.split()[0] for n in d["notes"]] == ["kernels.elementwise=fused", "the", "offload"]
    assert d["notes"][1].startswith("the predicted overhead (1.00 GiB")
    # The AdamW moments live in host memory (offload: optimizer): host bytes beside the device peak.
    moments = result.report.measured_host_bytes
    assert moments > 0 and d["measured_host_gib"] == pytest.approx(moments / 2**30)
    assert d["host_components"]["model_states"]["measured"] == pytest.approx(d["measured_host_gib"])
    assert d["components"]["optimizer"]["measured"] == pytest.approx(0.0, abs=1e-6)
    assert d["measured_device_gib"] == d["measured_peak_gib"]


@pytest.mark.parametrize(("family", "layers", "layout"), [
    # MoE x 10, recompute 0.5: two extrapolated segments [full x 5][none x 5]; one micro-batch, so
    # gradients accumulate during backward and the peak is an interior block.
    ("qwen3_moe", 10, dict(devices=4, ep=2, sp=1, recompute=0.5, grad_accum=1)),
    # (sliding, full) x 5 with EP and Ulysses: a periodic pattern.
    ("gpt_oss", 10, dict(devices=8, ep=4, sp=2, recompute="none", grad_accum=1)),
    # Offloaded layer inputs and moments: host bytes grow with the copies too.
    ("qwen3_moe", 10, dict(devices=4, ep=2, sp=1, recompute="full", offload=("optimizer", "activations"))),
])
def test_reduced_depth_extrapolates_to_the_full_run(tmp_path, family, layers, layout):
    from xplan.runtime.dryrun import dry_run

    overrides = {"num_hidden_layers": layers}
    if family == "qwen3_moe":
        overrides["mlp_only_layers"] = []
    if family == "gpt_oss":
        overrides["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2)
    plan = tiny_plan(model_dir(tmp_path, family, **overrides), **layout)
    full = dry_run(plan)
    reduced = dry_run(plan, layers=3)
    assert reduced.extrapolated and reduced.layers_run < full.layers_run
    assert reduced.measured_peak_bytes == pytest.approx(full.measured_peak_bytes, rel=1e-9)
    assert reduced.peak_phase == full.peak_phase
    for name, value in full.measured.items():
        assert reduced.measured[name] == pytest.approx(value, rel=1e-9, abs=1e-3), name
    assert reduced.measured_host_bytes == pytest.approx(full.measured_host_bytes, rel=1e-9)
    assert (full.measured_host_bytes > 0) == bool(layout.get("offload"))


def test_layer_segments():
    from xplan.runtime.dryrun import reduced_layers, segments

    d, m, s, f = ("dense", "none"), ("moe", "none"), ("sliding", "none"), ("full", "none")
    segs = segments([d] * 3 + [m] * 58)
    assert [(x.start, x.pattern, x.repeats) for x in segs] == [(0, (d,), 3), (3, (m,), 58)]
    segs = segments([s, f] * 18)
    assert [(x.pattern, x.repeats) for x in segs] == [((s, f), 18)]
    indices, keys = reduced_layers(segments([d] * 3 + [m] * 58), {1: 3})
    assert indices == [0, 1, 2, 3, 4, 5]
    assert [k[2] for k in keys] == ["first", "interior", "last"] * 2


def _matrix():
    name = "xplan_benchmarks_memory_matrix"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "memory_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MATRIX = _matrix()


@pytest.mark.parametrize("row", [2, 3, 13, 18, 22, 26, 30])
def test_cost_model_peak_within_3_percent_on_a_slice_of_the_matrix(row):
    """Full model size and world size, 3 and 4 copies of each repeated block pattern, extrapolated."""
    spec = MATRIX.MATRIX[row - 1]
    report = MATRIX.run_row(spec, "h800", layers=3)
    d = report.to_dict()
    worst = sorted(((c["predicted"] - c["measured"], k) for k, c in d["components"].items()), key=lambda x: -abs(x[0]))
    assert abs(report.error) <= THRESHOLD, (
        f"row {row} {spec}: predicted {d['predicted_peak_gib']:.2f} GiB, measured {d['measured_peak_gib']:.2f} GiB "
        f"({report.error:+.1%}); largest component differences (predicted - measured, GiB): {worst[:3]}")


def test_cli_dry_run_json_table_and_predictions(tmp_path):
    plan = tiny_plan(model_dir(tmp_path, "qwen3_moe"), devices=4, ep=2, sp=1, recompute="none")
    path = save_plan(plan, tmp_path / "plan.yaml")
    code, out, err = xplan("run", path, "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("measured_peak_gib", "predicted_peak_gib", "ratio", "components"):
        assert key in result
    assert result["measured_peak_gib"] > 0 and result["predicted_peak_gib"] > 0
    assert result["ratio"] == pytest.approx(result["measured_peak_gib"] / result["predicted_peak_gib"])
    assert result["predicted_source"] == "price"  # the plan has no predictions: priced now
    assert {"measured", "predicted"} <= set(result["components"]["activations"])
    assert sum(c["measured"] for c in result["components"].values()) == pytest.approx(result["measured_peak_gib"])
    code, out, err = xplan("run", path, "--dry-run")
    assert code == 0, err
    assert "measured GiB" in out and "peak" in out

    # A plan's recorded prediction is what is checked (unless --reprice) where the dry run executes
    # its layout as written; with fused elementwise kernels (compiled blocks, which the CPU dry run
    # runs eager) the layout is priced as executed instead.
    data = plan.to_dict()
    data["predictions"] = {"memory_gib": {"total": 1.0, "parameters": 0.25, "activations": 0.75}}
    for elementwise, source in (("eager", "plan"), ("fused", "price")):
        data["layout"]["kernels"] = {**data["layout"].get("kernels", {}), "elementwise": elementwise}
        path = tmp_path / f"predicted-{elementwise}.yaml"
        path.write_text(json.dumps(data))  # JSON is YAML
        code, out, err = xplan("run", path, "--dry-run", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["predicted_source"] == source, elementwise
    assert result["predicted_peak_gib"] != pytest.approx(1.0)  # fused: priced, not the recorded 1.0
    data["layout"]["kernels"]["elementwise"] = "eager"
    path.write_text(json.dumps(data))
    result = json.loads(xplan("run", path, "--dry-run", "--json")[1])
    assert result["predicted_peak_gib"] == pytest.approx(1.0)
    assert result["components"]["parameters"]["predicted"] == pytest.approx(0.25)


def test_cli_dry_run_bad_input_exits_2(tmp_path):
    directory = model_dir(tmp_path, "qwen3_moe")
    bad = save_plan(tiny_plan(directory, devices=6, ep=3, sp=1, recompute="none"), tmp_path / "bad.yaml")
    code, _, err = xplan("run", bad, "--dry-run")
    assert code == 2 and "ep (3) must divide" in err
    code, _, err = xplan("run", tmp_path / "missing.yaml", "--dry-run")
    assert code == 2
    good = save_plan(tiny_plan(directory, devices=2, ep=1, sp=1, recompute="none"), tmp_path / "good.yaml")
    code, _, err = xplan("run", good, "--layers", "1")
    assert code == 2 and "--dry-run" in err
    code, _, err = xplan("run", good, "--dry-run", "--imbalance", "0.5")
    assert code == 2 and "imbalance" in err
