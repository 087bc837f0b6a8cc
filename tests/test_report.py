"""`xplan report`: the HTML's structure, its numbers against `xplan estimate --json`, offline-ness;
the terminal tables; `--report` on search and whatif; headroom and provenance in the plan."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from xplan.cli import main

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("summary", "memory", "time", "binding", "alternatives", "pareto", "sweeps", "imbalance", "comparison-3d",
            "provenance")
# A preset MoE plan small enough to price in seconds: Qwen3-30B-A3B on 16 H800.
SEARCH = ["search", "qwen3-30b-a3b", "h800", "--devices", "16", "--global-batch", "64"]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def estimate_args(plan: dict) -> list[str]:
    """`xplan estimate` flags that reproduce a plan file's layout and workload."""
    lay = plan["layout"]
    args = ["estimate", plan["model"], plan["hardware"], "--devices", str(plan["devices"]),
            "--seq-len", str(plan["training"]["seq_len"]), "--global-batch", str(plan["training"]["global_batch"])]
    for key in ("dp_mode", "fsdp", "ep", "sp", "tp", "pp", "vpp", "micro_batch", "precision", "tp_comm"):
        args += [f"--{key.replace('_', '-')}", str(lay[key])]
    args += ["--recompute", str(lay["recompute"]), "--offload", ",".join(lay["offload"]) or "none",
             "--tile-tokens", str(lay["tile_tokens"] or 0), "--keep-gathered", ",".join(lay["keep_gathered"]) or "none",
             "--allocator", lay["allocator"]]
    for slot, value in lay["kernels"].items():
        args += [f"--{slot.replace('_', '-')}", value]
    return args + ["--json"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One plan from search and its report (HTML and JSON), built once for the module."""
    folder = tmp_path_factory.mktemp("report")
    plan = folder / "plan.yaml"
    assert main([*SEARCH, "-o", str(plan), "--json"]) == 0
    return folder, plan


@pytest.fixture(scope="module")
def report_json(built):
    folder, plan = built
    import contextlib
    import io

    html = folder / "report.html"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", str(plan), "--html", str(html), "--json"]) == 0
    return json.loads(buf.getvalue()), html.read_text()


def test_report_numbers_equal_estimate_json(built, report_json, capsys):
    _, plan = built
    data, html = report_json
    code, out, err = run(estimate_args(yaml.safe_load(plan.read_text())), capsys)
    assert code == 0, err
    expected = json.loads(out)
    expected.pop("model"), expected.pop("hardware"), expected.pop("levers")  # levers: estimate's own lines
    assert data["runtime_refusals"] == expected.pop("runtime_refusals") == []  # a plan search wrote runs
    assert data["estimate"] == expected
    assert "<code>xplan run</code> executes this layout" in html
    embedded = json.loads(re.search(r'<script type="application/json" id="xplan-report-data">(.*?)</script>',
                                    html, re.S).group(1))
    assert embedded["estimate"] == expected
    # The tables show the same numbers the estimate prints.
    assert f"{expected['tokens_per_s_per_device']:,.0f}" in html
    assert f"{expected['step_time_s']:.3f}" in html
    assert f"{expected['memory_gib']['total']:.2f}" in html
    for key, value in expected["time_s"].items():
        if value:
            assert f"{value:.3f}" in html, key


def test_report_html_has_every_section_and_is_offline(report_json):
    data, html = report_json
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    assert not re.search(r"https?://", html), "the report must not reference the network"
    assert "<script" not in html.replace('<script type="application/json" id="xplan-report-data">', "")
    figures = re.findall(r'<figure id="fig-(\w+)"><svg', html)
    assert len(figures) >= 5 and {"memory", "time", "pareto", "seq", "devices", "imbalance", "versus3d"} <= set(figures)
    # Several SVGs in one page: every id is unique.
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))


def test_report_content_explains_the_plan(report_json):
    data, _ = report_json
    assert data["binding"]["explanation"][0].startswith("binding: ")
    mem = data["memory"]
    assert mem["usable_gib"] == pytest.approx(mem["capacity_gib"] - mem["headroom_gib"])
    assert "host_capacity" not in mem["device_gib"] and "capacity" not in mem["device_gib"]
    assert data["alternatives"] and all(a["changes"] and a["summary"] for a in data["alternatives"])
    assert any(p["chosen"] for p in data["search"]["pareto"]) or data["search"]["pareto"]
    assert len(data["sweeps"]["seq_len"]["points"]) >= 3 and len(data["sweeps"]["devices"]["points"]) >= 3
    assert data["imbalance_sensitivity"]["points"][0]["x"] == 1.0
    best3d = data["comparison_3d"]["best_3d"]
    assert best3d is None or best3d["layout"]["tp"] * best3d["layout"]["pp"] > 1
    prov = data["provenance"]
    assert prov["command"].startswith("xplan search") and prov["profile_changed"] is False


def test_report_terminal_tables(built, capsys):
    _, plan = built
    code, out, err = run(["report", str(plan), "--top", "2"], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    for needle in ("memory per device", "time per step", "exposed communication by kind", "binding constraint",
                   "alternatives and what separates each", "free at peak", "host: offloaded"):
        assert needle in text, needle
    assert text.count("#2") + text.count("#3") + text.count("#4") <= 3


def test_report_of_a_dense_model_says_imbalance_does_not_apply(tmp_path, tiny_moe_dir, capsys):
    from xplan.app.report_data import build_report
    from xplan.app.report_html import render_html
    from xplan.layout import layout_from_dict
    from xplan.planner.pricing import Workload

    dense = tmp_path / "dense"
    dense.mkdir()
    config = json.loads((Path(tiny_moe_dir) / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("num_experts", "num_experts_per_tok",
                                                           "moe_intermediate_size")} | {"model_type": "qwen3"}
    (dense / "config.json").write_text(json.dumps(config))
    layout = layout_from_dict({"devices": 2, "precision": "fp32", "kernels": {"elementwise": "eager"}})
    data = build_report(Workload(str(dense), "cpu", 64, 8), layout)
    assert data["imbalance_sensitivity"] is None
    html = render_html(data)
    assert "no routing to be imbalanced" in html and not re.search(r"https?://", html)


def test_search_and_whatif_write_reports(built, tmp_path, capsys):
    _, plan = built
    out_file = tmp_path / "s.html"
    code, out, err = run([*SEARCH, "--top", "3", "--report", str(out_file), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["report_file"] == str(out_file) and '<section id="alternatives">' in out_file.read_text()
    what = tmp_path / "w.html"
    code, out, err = run(["whatif", str(plan), "--set", "seq_len=8192", "--report", str(what)], capsys)
    assert code == 0, err
    html = what.read_text()
    assert "plan as written" in html and "what if seq_len=8192" in html


def test_plan_records_provenance_and_headroom(tmp_path, capsys):
    from xplan import __version__
    from xplan.hw_profiles.loader import PROFILE_DIR
    from xplan.plan import load_plan

    path = tmp_path / "p.yaml"
    code, out, err = run([*SEARCH, "--headroom", "20", "-o", str(path), "--json"], capsys)
    assert code == 0, err
    plan = load_plan(path).data
    assert plan.xplan_version == __version__ and plan.headroom_gib == 20.0
    assert datetime.fromisoformat(plan.created.replace("Z", "+00:00")).tzinfo is not None
    assert plan.command.startswith("xplan ") and "--headroom 20" in plan.command
    assert plan.profile_sha256 == hashlib.sha256((PROFILE_DIR / "h800.yaml").read_bytes()).hexdigest()
    result = json.loads(out)
    assert result["headroom_gib"] == 20.0
    assert all(p["memory_gib"]["allocated"] <= p["memory_gib"]["capacity"] - 20 for p in result["plans"])


def test_headroom_changes_the_choice(capsys):
    code, out, _ = run([*SEARCH, "--json"], capsys)
    assert code == 0
    free = json.loads(out)["plans"][0]
    peak, capacity = free["memory_gib"]["allocated"], free["memory_gib"]["capacity"]
    need = capacity - peak + 1  # more than #1 leaves free: #1 no longer fits
    code, out, err = run([*SEARCH, "--headroom", f"{need:.2f}GiB", "--json"], capsys)
    assert code == 0, err
    kept = json.loads(out)["plans"]
    assert kept[0]["layout"] != free["layout"]
    assert all(p["memory_gib"]["allocated"] <= capacity - need for p in kept)


@pytest.mark.parametrize(("text", "gib"), [("8", 8.0), ("8GiB", 8.0), ("0.1", 8.0), ("10%", 8.0), (None, 0.0),
                                           ("0", 0.0), ("2.5g", 2.5)])
def test_parse_headroom(text, gib):
    from xplan.cli.search_cmd import parse_headroom

    assert parse_headroom(text, 80.0) == pytest.approx(gib)


@pytest.mark.parametrize("text", ["80", "lots", "-1", "100%"])
def test_bad_headroom_is_an_input_error(text):
    from xplan.cli.search_cmd import parse_headroom
    from xplan.errors import InputError

    with pytest.raises(InputError, match="--headroom"):
        parse_headroom(text, 80.0)


def test_whatif_notes_a_changed_profile(tmp_path, capsys):
    from xplan.hw_profiles.loader import PROFILE_DIR

    profile = tmp_path / "my-h800.yaml"
    profile.write_text((PROFILE_DIR / "h800.yaml").read_text())
    path = tmp_path / "p.yaml"
    assert run(["search", "qwen3-30b-a3b", str(profile), "--devices", "16", "--global-batch", "64", "-o", str(path),
                "--json"], capsys)[0] == 0
    code, out, _ = run(["whatif", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)["notes"] == []
    profile.write_text(profile.read_text() + "\n# edited\n")
    code, out, _ = run(["whatif", str(path), "--json"], capsys)
    assert code == 0 and "changed since the plan was written" in json.loads(out)["notes"][0]
