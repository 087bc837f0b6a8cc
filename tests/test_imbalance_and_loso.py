"""Routing imbalance (a sourced default shown in every MoE estimate, measured by `xplan run`,
reused by whatif) and leave-one-source-out refitting on a hand-made set."""

from __future__ import annotations

import json

import pytest
import yaml

from xplan.cli import main
from xplan.cost_models.routing import DEFAULT_IMBALANCE, MEASURED_MIN_EP, default_imbalance, imbalance_note
from xplan.hw_profiles import load_profile
from xplan.layout import layout_from_dict


@pytest.fixture(autouse=True)
def _trace_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPLAN_CACHE_DIR", str(tmp_path / "trace-cache"))


class _MoE:
    num_experts = 64


class _Dense:
    num_experts = 0


def test_default_imbalance_applies_where_it_was_measured():
    big, small = layout_from_dict({"devices": 64, "ep": MEASURED_MIN_EP}), layout_from_dict({"devices": 8, "ep": 8})
    assert default_imbalance(big, _MoE()) == DEFAULT_IMBALANCE
    assert default_imbalance(small, _MoE()) == 1.0
    assert default_imbalance(big, _Dense()) == 1.0
    assert "UltraEP" in imbalance_note(big, _MoE(), DEFAULT_IMBALANCE, given=False)
    assert "no published busiest-rank measurement" in imbalance_note(small, _MoE(), 1.0, given=False)
    assert "as given" in imbalance_note(small, _MoE(), 1.2, given=True)
    assert imbalance_note(small, _Dense(), 1.0, given=False) is None


def test_every_moe_estimate_says_its_imbalance_and_every_estimate_its_dp_mode(capsys):
    args = ["estimate", "qwen3-30b-a3b", "h100", "--devices", "16", "--ep", "8", "--pp", "2", "--seq-len", "1024"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["imbalance"] == 1.0 and out["layout"]["dp_mode"] == "zero1"  # pp > 1: the distributed optimizer
    assert any("routing imbalance 1.00 by default" in n for n in out["notes"])
    assert main([*args, "--imbalance", "1.2"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "zero1 over 8 ranks" in text and "routing imbalance 1.20" in text


def test_whatif_reuses_a_runs_measured_imbalance(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    assert main(["search", "qwen3-30b-a3b", "h100", "--devices", "16", "--seq-len", "1024", "--ep", "8",
                 "-o", str(plan), "--json"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "ep_imbalance": v})
                                                 for i, v in enumerate((1.10, 1.30, 1.20), 1)) + "\n")
    assert main(["whatif", str(plan), "--set", f"imbalance={run}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["after"]["imbalance"] == pytest.approx(1.20)  # the median over the run's steps
    assert out["after"]["tokens_per_s_per_device"] < out["before"]["tokens_per_s_per_device"]
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["whatif", str(plan), "--set", f"imbalance={run}"]) == 2
    assert "holds no ep_imbalance" in " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------ leave one source out
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
        "tie_word_embeddings": False}


def test_with_constant_sets_one_number():
    from xplan.app.validation_loso import with_constant

    h100 = load_profile("h100")
    changed = with_constant(h100, "compute.gemm.max_fraction.bf16", 0.5)
    assert changed.compute.gemm.max_fraction.bf16 == 0.5 and h100.compute.gemm.max_fraction.bf16 != 0.5
    assert with_constant(h100, "interconnect.levels[1].bandwidth_gbps", 10).levels[1].bandwidth_gbps == 10


def test_loso_refits_on_the_other_sources_and_falls_back_to_the_prior(tmp_path):
    """A profile whose GEMM ceiling is fitted on rows of sources A and B: leaving A out refits the
    ceiling on B's row (which then comes out right again); a constant fitted on A's rows only takes
    its prior."""
    from xplan.app.validation import run_validation

    base = load_profile("h100").to_dict()
    base["name"] = "h100-fitted"
    base["fitted_on"] = {"compute.gemm.max_fraction.bf16": {"rows": ["a1", "b1"], "prior": 0.5},
                         "memory.fragmentation": {"rows": ["a1"], "prior": None}}
    profile_path = tmp_path / "h100-fitted.yaml"
    profile_path.write_text(yaml.safe_dump(base, sort_keys=False))
    layout = {"devices": 2, "fsdp": 2, "micro_batch": 1, "recompute": "none", "precision": "bf16",
              "kernels": {"loss": "full"}}
    rows = [{"id": i, "model": "tiny", "reported": {"tokens_per_s_per_gpu": 1.0e5, "memory_gib": 1.0}}
            for i in ("a1", "b1")]
    cases = {"models": {"tiny": TINY}, "cases": [
        {"id": i, "source": i[0], "model": "tiny", "hardware": str(profile_path), "layout": layout, "seq_len": 64,
         "global_batch": 4, "metrics": [{"metric": "tokens_per_s_per_gpu", "published": 1.0e5,
                                         "field": "reported.tokens_per_s_per_gpu"}]} for i in ("a1", "b1")]}
    pub, cas = tmp_path / "pub.yaml", tmp_path / "cases.yaml"
    pub.write_text(yaml.safe_dump({"results": rows}))
    cas.write_text(yaml.safe_dump(cases))
    report = run_validation(cache_dir=tmp_path / "cache", published_path=pub, cases_path=cas, loso=True)
    assert all(r.calibration for r in report.rows)
    refits = {(r["source"], r["constant"]): r for r in report.loso["refits"]}
    assert refits[("a", "memory.fragmentation")]["value"] is None  # only a1's: the prior
    assert "refitted on 1 rows" in refits[("a", "compute.gemm.max_fraction.bf16")]["how"]
    assert ("b", "memory.fragmentation") not in refits  # fitted on none of b's rows: kept
    loso = {r.id: r for r in report.loso["rows"]}
    plain = {r.id: r for r in report.rows}
    assert set(loso) == {"a1", "b1"} and loso["a1"].published == plain["a1"].published
