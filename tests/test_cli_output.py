"""What the commands print for people: search's one table and its explanation, whatif's deltas and
messages, estimate's memory table, the CPU run's memory line, inspect's recompute note, and the
newcomer's path through the README (issue #19)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from xplan.cli import main
from xplan.cli.app import console

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["qwen3-30b-a3b", "h800", "--devices", "16", "--global-batch", "64"]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setattr(console, "width", 80)


def rows_of(out: str) -> list[str]:
    """The row labels of search's table: '1', '2', ... and 'P1', ... (marks stripped)."""
    return [m.group(1) for m in re.finditer(r"^\s*(P?\d+)\*?●?\s+[\d,]+\s+[\d.]+%", out, re.M)]


def test_search_table_at_80_columns_cuts_nothing_and_shows_every_field(narrow, capsys):
    code, out, err = run(["search", *SMALL, "--precision", "fp8", "--top", "4"], capsys)
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    text = " ".join(out.split())
    assert "precision=fp8" in text and "vpp=1" in text  # fields common to all rows are listed once
    rows = rows_of(out)
    assert [r for r in rows if not r.startswith("P")] == ["1", "2", "3", "4"]
    assert len([r for r in rows if r.startswith("P")]) <= 4  # --top caps the Pareto rows too
    assert "Pareto" not in text.split("best layouts")[1].split("all rows")[0] or "●" in out


def test_search_differing_fields_get_columns_or_share_one_that_wraps(monkeypatch, capsys):
    args = ["search", "qwen3-235b-a22b", "h800", "--devices", "256", "--global-batch", "2048", "--top", "3"]
    monkeypatch.setattr(console, "width", 140)
    code, out, err = run(args, capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if "tok/s" in line)
    # (every top plan recomputes fully: activation offload makes that the fastest way to fit)
    assert all(f" {name} " in f" {header} " for name in ("ep", "mb", "off", "tile"))
    assert "off = offload" in " ".join(out.split())
    monkeypatch.setattr(console, "width", 60)  # too narrow for a column each: key=value in one column
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 60
    assert "layout (fields" in out and "ep=2" in out and "off=opt+act" in out and "tile=8192" in out


@pytest.mark.parametrize("top", [1, 2])
def test_top_caps_every_table_and_the_json(top, capsys):
    code, out, _ = run(["search", *SMALL, "--top", str(top)], capsys)
    assert code == 0
    rows = rows_of(out)
    assert len([r for r in rows if not r.startswith("P")]) == top
    assert len([r for r in rows if r.startswith("P")]) <= top
    code, out, _ = run(["search", *SMALL, "--top", str(top), "--json"], capsys)
    assert len(json.loads(out)["plans"]) == top


def test_search_explains_why_the_best_won(capsys):
    # Without offload (which would make the top plans differ in it alone), as close to HBM as before.
    code, out, _ = run(["search", "qwen3-235b-a22b", "h800", "--devices", "256", "--global-batch", "2048",
                        "--offload", "none"], capsys)
    assert code == 0
    text = " ".join(out.split())
    why = re.search(r"Why #1: ([\d,]+) tokens/s/device, ([\d.]+)% more than the runner-up #2 \(([\d,]+)\), which "
                    r"changes (.+?)\. Decisive: #2 spends \+([\d.]+) (s|ms)/step on (.+?) \(", text)
    assert why, text
    assert "ep 1 → 2" in why.group(4) and why.group(7) == "expert all-to-all"
    assert re.search(r"peaks at 69\.0 GiB allocated of 80 GiB per device \(11\.0 GiB free; 76\.8 GiB reserved", text)
    assert "--headroom" not in text  # suggested only when less than 10% of the device is left free


def test_search_time_includes_tracing(tmp_path, monkeypatch, tiny_moe_dir, capsys):
    from xplan.planner import pricing

    monkeypatch.setenv("XPLAN_CACHE_DIR", str(tmp_path / "cache"))  # nothing traced yet
    pricing.get_trace.cache_clear()
    code, out, err = run(["search", tiny_moe_dir, "cpu", "--devices", "2", "--seq-len", "64", "--global-batch", "8",
                          "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["trace_time_s"] > result["search_time_s"] > 0
    assert result["elapsed_s"] >= result["trace_time_s"] + result["search_time_s"]
    pricing.get_trace.cache_clear()
    code, out, _ = run(["search", tiny_moe_dir, "cpu", "--devices", "2", "--seq-len", "64", "--global-batch", "8"],
                       capsys)
    match = re.search(r"searched in ([\d.]+) s: ([\d.]+) s loading the model, profile and traces .*?, ([\d.]+) s "
                      r"pricing", " ".join(out.split()))
    assert match and float(match.group(1)) >= float(match.group(2))


def help_words(out: str) -> str:
    """Help text as one line of words, rich's panel borders left out (they split wrapped lines)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())


def test_global_batch_defaults_agree_with_help_behaviour_and_docs(capsys):
    code, out, _ = run(["search", "--help"], capsys)
    assert "one per device" in help_words(out)
    code, out, _ = run(["estimate", "--help"], capsys)
    assert "one micro-batch per data-parallel rank" in help_words(out)
    code, out, _ = run(["search", *SMALL[:4], "--json"], capsys)
    assert json.loads(out)["global_batch"] == 16  # one sequence per device
    code, out, _ = run(["estimate", *SMALL[:4], "--sp", "2", "--micro-batch", "3", "--json"], capsys)
    est = json.loads(out)
    assert est["global_batch"] == 8 * 3 and est["grad_accum"] == 1  # data-parallel (16 / sp 2) × micro-batch
    docs = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    assert "one micro-batch per data-parallel rank (`estimate`) or one sequence per device (`search`)" in docs


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("whatif") / "plan.yaml"
    assert main(["search", *SMALL, "-o", str(path), "--json"]) == 0
    return path


def test_whatif_mfu_delta_in_percentage_points(plan_file, capsys):
    code, out, _ = run(["whatif", str(plan_file), "--set", "seq_len=8192"], capsys)
    assert code == 0
    mfu = next(line for line in out.splitlines() if "MFU" in line)
    assert re.search(r"[+-]\d+\.\d pp", mfu) and "(" not in mfu.split("%")[-1]
    code, out, _ = run(["whatif", str(plan_file), "--set", "seq_len=8192", "--json"], capsys)
    result = json.loads(out)
    assert result["delta"]["MFU"] == pytest.approx(result["after"]["mfu"] - result["before"]["mfu"])


@pytest.mark.parametrize(("change", "expected"), [
    ("micro_batch=3", ["--set global_batch=N with N a multiple of", "--set micro_batch=M"]),
    ("global_batch=100", ["--set global_batch=N"]),
    ("fsdp=x", ["--set fsdp=… needs an integer"]),
    ("seq_len=0", ["--set seq_len=… must be a positive integer"]),
])
def test_whatif_errors_name_set_keys(plan_file, change, expected, capsys):
    code, _, err = run(["whatif", str(plan_file), "--set", change], capsys)
    text = " ".join(err.split())
    assert code == 2
    for needle in expected:
        assert needle in text, text
    assert not re.search(r"--(global-batch|micro-batch|seq-len|fsdp)\b", text)


def test_capacities_are_not_rows_of_the_memory_tables(plan_file, capsys):
    code, out, _ = run(["estimate", *SMALL, "--offload", "optimizer"], capsys)
    assert code == 0
    table = out.split("memory per device")[1].split("time per step")[0]
    body = table.split("allocated (must fit)")[0]
    assert "host_capacity" not in out and "capacity" not in body and "offloaded" not in body
    assert "host memory:" in out and "device memory (busiest rank):" in out
    code, out, _ = run(["whatif", str(plan_file), "--set", "offload=optimizer"], capsys)
    assert code == 0
    device_rows, after = out.split("device memory GiB")
    assert "host_capacity" not in out and "offloaded" not in device_rows and "host: offloaded GiB" in after


def test_cpu_run_compares_like_with_like_or_says_what_it_compares(capsys):
    from xplan.cli.run_cmd import render_summary
    from xplan.runtime.train.metrics import MetricsLog

    log = MetricsLog(None, append=False, live=True, title="xplan run: tiny", predictions={"memory_gib": {"total": 0.004},
                     "step_time_s": 0.1}, memory="rss_peak")
    log.log({"step": 1, "loss": 5.0, "grad_norm": 1.0, "lr": 1e-3, "step_time_s": 0.2,
             "tokens_per_s_per_device": 100.0, "peak_memory_gib": 0.52})
    log.close()
    out = capsys.readouterr().out
    assert "peak/pred" not in out and "rss 0.52 GiB" in out and "not comparable" in " ".join(out.split())
    summary = {"losses": [5.0], "start_step": 0, "end_step": 1, "step_time_s": 0.2, "tokens_per_s_per_device": 100.0,
               "peak_memory_kind": "rss_peak", "peak_memory_gib": 0.52, "predicted_peak_gib": 0.004,
               "predicted_step_time_s": 0.1, "step_time_ratio": 2.0, "peak_memory_ratio": 130.0}
    render_summary(summary)
    out = " ".join(capsys.readouterr().out.split())
    assert "130" not in out and "process RSS" in out and "0.004 GiB" in out and "not comparable" in out
    render_summary({**summary, "peak_memory_kind": "max_memory_allocated", "peak_memory_ratio": 1.02})
    assert "peak memory / predicted" in " ".join(capsys.readouterr().out.split())


def test_inspect_explains_selective_keeping_more(tmp_path, capsys):
    from tests.trace_configs import TINY, family_available

    if not family_available("deepseek_v3"):
        pytest.skip("DeepSeek-V3 runtime model not present")
    (tmp_path / "config.json").write_text(json.dumps(TINY["deepseek_v3"]))
    code, out, err = run(["inspect", str(tmp_path), "--seq-len", "256"], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "selective keeps more than none" in text and "bmm outputs in self_attn" in text


def test_selective_note_only_when_selective_keeps_more():
    from xplan.app.report_explain import selective_note

    assert selective_note({"dense": {"none": 10, "selective": 8, "full": 1}}) is None
    assert "dense" in selective_note({"dense": {"none": 10, "selective": 20, "full": 1}})


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_tiny_model_recipe_makes_a_model_directory(tmp_path):
    readme = (ROOT / "README.md").read_text()
    recipe = re.search(r"```bash\n(mkdir -p tiny-moe && python3 -c .*?)\n", readme)
    assert recipe, "README lost the one-line tiny model recipe"
    subprocess.run(recipe.group(1), shell=True, cwd=tmp_path, check=True)
    from xplan.runtime.models import load_config

    config = load_config(str(tmp_path / "tiny-moe"))
    assert config.num_experts and config.num_layers == 2


def test_readme_setup_keeps_two_commands_and_shows_multi_node_and_the_report():
    readme = (ROOT / "README.md").read_text()
    assert len(re.findall(r"```bash\n", _section(readme, "Set up"))) == 2
    nodes = _section(readme, "Several nodes")
    assert "torchrun" in nodes and "sbatch" in nodes and "srun" in nodes and "torch_npu" in nodes
    assert "--nnodes" in nodes and "devices_per_node" in nodes
    picture = re.search(r"!\[[^]]*\]\((docs/[^)]+\.png)\)", readme)
    assert picture and (ROOT / picture.group(1)).is_file()
    assert (ROOT / "benchmarks" / "report_screenshot.sh").is_file()
