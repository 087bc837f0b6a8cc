"""The planner on vision-language models: `--image-tokens` traces the vision tower (its FLOPs are
those torch counts on the runtime's own tower), prices it in estimate / search / whatif, and bad
values are clear errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from xplan.cli import main


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trace_prices_the_vision_tower(vlm_dir):
    from torch.utils.flop_counter import FlopCounterMode

    from xplan.planner.trace import trace_model
    from xplan.runtime import build_model, load_config

    text = trace_model(str(vlm_dir), 32, loss="full", use_cache=False)
    images = trace_model(str(vlm_dir), 32, loss="full", image_tokens=8, use_cache=False)
    stages = [images.graph.nodes[name] for name in ("vision", "vision_embed")]  # encoder layers; patches, projector
    config = load_config(str(vlm_dir))
    model = build_model(config)
    pixels = torch.randn(2, 3, 56, 56)
    with FlopCounterMode(display=False) as counter:  # GEMMs and the patch convolution (not CPU SDPA)
        model.image_features(pixels)
    spec = config.vision_spec
    tokens = spec.patches_per_image
    attention = spec.num_layers * 4 * 2 * spec.num_heads * tokens * tokens * spec.head_dim  # QK^T and PV, 2 images
    tower = sum(stage["flops_forward"] for stage in stages)
    assert tower == counter.get_total_flops() + attention
    assert images.flops_forward == text.flops_forward + tower
    assert images.others["vision"].saved_bytes["none"] > text.others["vision"].saved_bytes["none"] == 0
    assert spec.tokens_per_image == 4


def test_estimate_and_whatif_take_image_tokens(vlm_dir, capsys, tmp_path):
    # (256 tokens: shorter sequences of this tiny model peak at the optimizer step, with no activations)
    base = ["estimate", vlm_dir, "cpu", "--devices", 1, "--seq-len", 256, "--precision", "fp32", "--json"]
    code, out, _ = cli(capsys, *base)
    text = json.loads(out)
    code, out, _ = cli(capsys, *base, "--image-tokens", 8)
    assert code == 0
    images = json.loads(out)
    assert images["memory_gib"]["activations"] > text["memory_gib"]["activations"]
    assert images["step_time_s"] > text["step_time_s"]
    code, _, err = cli(capsys, "search", vlm_dir, "cpu", "--devices", 2, "--seq-len", 32, "--global-batch", 4,
                       "--precision", "fp32", "--image-tokens", 8, "-o", tmp_path / "plan.yaml", "--json")
    assert code == 0, err
    plan = (tmp_path / "plan.yaml").read_text()
    assert "image_tokens: 8" in plan and "sp: 1" in plan
    code, out, err = cli(capsys, "whatif", tmp_path / "plan.yaml", "--set", "image_tokens=16", "--json")
    assert code == 0, err


@pytest.mark.parametrize("model, tokens, message", [
    (None, 6, "multiple of the 4 image tokens"),
    (None, 32, "must leave text"),
    ("qwen3-0.6b", 8, "needs a vision-language model"),
])
def test_bad_image_tokens_exit_2(vlm_dir, capsys, model, tokens, message):
    code, _, err = cli(capsys, "estimate", model or vlm_dir, "cpu", "--devices", 1, "--seq-len", 32,
                       "--image-tokens", tokens)
    assert code == 2 and message in " ".join(err.split()), err


def test_vision_recompute_is_traced_and_priced(vlm_dir, capsys, tmp_path):
    """The vision tower's layers under each recompute policy: the trace measures what each keeps and
    redoes, estimate prices it (less memory, more recompute time), search chooses it, and a model
    without a vision tower refuses it (exit 2)."""
    from xplan.planner.trace import trace_model

    tower = trace_model(str(vlm_dir), 32, loss="full", image_tokens=8, use_cache=False).others["vision"]
    saved, redone = tower.saved_bytes, tower.recompute_flops
    assert saved["none"] > saved["selective"] > saved["full"] > 0
    assert redone["none"] == redone["selective"] == 0 < redone["full"]  # selective redoes no GEMM or attention

    base = ["estimate", vlm_dir, "cpu", "--devices", 1, "--seq-len", 256, "--precision", "fp32",
            "--image-tokens", 64, "--json"]
    priced = {}
    for policy in ("none", "selective", "full"):
        code, out, err = cli(capsys, *base, "--vision-recompute", policy)
        assert code == 0, err
        priced[policy] = json.loads(out)
    memory = {p: e["memory_gib"]["activations"] for p, e in priced.items()}
    recompute = {p: e["time_s"]["recompute"] for p, e in priced.items()}
    assert memory["none"] > memory["selective"] > memory["full"]
    assert recompute["none"] == 0 < recompute["selective"] < recompute["full"]
    assert priced["full"]["layout"]["vision_recompute"] == "full"

    code, out, err = cli(capsys, "search", vlm_dir, "cpu", "--devices", 1, "--seq-len", 256, "--global-batch", 1,
                         "--precision", "fp32", "--image-tokens", 64, "--json")
    assert code == 0, err
    chosen = {p["layout"]["vision_recompute"] for p in json.loads(out)["plans"]}
    assert chosen == {"none", "selective", "full"}  # all three priced; the fastest first
    assert json.loads(out)["plans"][0]["layout"]["vision_recompute"] == "none"

    code, _, err = cli(capsys, "estimate", "qwen3-0.6b", "cpu", "--devices", 1, "--seq-len", 32,
                       "--vision-recompute", "full")
    assert code == 2 and "needs a vision-language model" in " ".join(err.split()), err


def test_image_fraction_prices_the_busiest_ranks_images(vlm_dir, capsys, tmp_path):
    """Mixed image/text batches: the tower's time at ceil(m f) / m of a micro-batch of m samples (the
    busiest rank sets the pace), its memory at a micro-batch of image samples, MFU at f of its FLOPs."""
    base = ["estimate", vlm_dir, "cpu", "--devices", 1, "--seq-len", 256, "--precision", "fp32", "--json",
            "--micro-batch", 4, "--global-batch", 4]

    def priced(*extra):
        code, out, err = cli(capsys, *base, *extra)
        assert code == 0, err
        return json.loads(out)

    shares = {f: priced("--image-tokens", 64, "--image-fraction", f) for f in (0.25, 0.5, 0.6, 1.0)}
    compute = {f: e["time_s"]["compute"] for f, e in shares.items()}
    quarter = compute[0.5] - compute[0.25]  # one image sample of four
    assert quarter > 0
    assert compute[1.0] - compute[0.5] == pytest.approx(2 * quarter, rel=1e-9)
    assert compute[0.6] == pytest.approx(compute[1.0] - quarter, rel=1e-12)  # ceil(4 x 0.6) = 3 of 4
    assert all(e["memory_gib"] == shares[1.0]["memory_gib"] for e in shares.values())
    flops = {f: e["flops_per_token"] for f, e in shares.items()}  # model FLOPs: f of the tower's, on average
    assert flops[0.6] - flops[0.5] == pytest.approx((flops[1.0] - flops[0.5]) / 5, rel=1e-9)
    # One sample per micro-batch: some rank's sample carries images in every micro-batch.
    one = ["--micro-batch", 1, "--image-tokens", 64]
    assert priced(*one, "--image-fraction", 0.5)["step_time_s"] == priced(*one)["step_time_s"]

    code, _, err = cli(capsys, "search", vlm_dir, "cpu", "--devices", 1, "--seq-len", 256, "--global-batch", 2,
                       "--precision", "fp32", "--image-tokens", 64, "--image-fraction", 0.5, "-o",
                       tmp_path / "plan.yaml", "--json")
    assert code == 0, err
    assert "image_fraction: 0.5" in (tmp_path / "plan.yaml").read_text()
    code, out, err = cli(capsys, "whatif", tmp_path / "plan.yaml", "--set", "image_fraction=1", "--json")
    assert code == 0, err
    for bad, message in (("0", "in (0, 1]"), ("1.5", "in (0, 1]")):
        code, _, err = cli(capsys, *base, "--image-tokens", 64, "--image-fraction", bad)
        assert code == 2 and message in err, err
    code, _, err = cli(capsys, *base, "--image-fraction", 0.5)
    assert code == 2 and "needs --image-tokens" in err, err
    code, _, err = cli(capsys, "search", vlm_dir, "cpu", "--devices", 2, "--seq-len", 256, "--image-tokens", 64,
                       "--image-fraction", 0.5, "--sp", 2)
    assert code == 2 and "use sp 1" in " ".join(err.split()), err  # as the runtime refuses it
    code, _, err = cli(capsys, "search", vlm_dir, "cpu", "--devices", 2, "--seq-len", 256, "--images", 1,
                       "--sp", 2, "--micro-batch", 1)  # one image per micro-batch cannot split over 2 ranks
    assert code == 2 and "make micro_batch x images per sample a multiple of sp" in " ".join(err.split()), err


def test_images_give_the_image_tokens(vlm_dir, capsys):
    base = ["estimate", vlm_dir, "cpu", "--devices", 1, "--seq-len", 256, "--precision", "fp32", "--json"]
    code, out, err = cli(capsys, *base, "--images", 3)  # 4 image tokens per 56x56 image
    assert code == 0, err
    by_images = json.loads(out)
    assert (by_images["image_tokens"], by_images["images_per_sample"], by_images["image_fraction"]) == (12, 3, 1.0)
    code, out, _ = cli(capsys, *base, "--image-tokens", 12)
    assert json.loads(out)["step_time_s"] == by_images["step_time_s"]
    code, _, err = cli(capsys, *base, "--images", 3, "--image-tokens", 8)
    assert code == 2 and "give one of the two" in " ".join(err.split()), err
    code, _, err = cli(capsys, "estimate", "qwen3-0.6b", "cpu", "--devices", 1, "--seq-len", 32, "--images", 1)
    assert code == 2 and "needs a vision-language model" in " ".join(err.split()), err


def test_keep_gathered_vision_prices_the_tower_gathered_across_micro_batches(vlm_dir, capsys):
    """The tower's FSDP units kept gathered: its weights (but the patch embeddings', resharded anyway)
    stay on the device all step, and its all-gathers fall from two per micro-batch to one per step."""
    from xplan.runtime import build_model, load_config

    base = ["estimate", vlm_dir, "cpu", "--devices", 2, "--seq-len", 256, "--precision", "fp32", "--json",
            "--global-batch", 8, "--image-tokens", 64]
    priced = {}
    for keep in ("none", "vision"):
        code, out, err = cli(capsys, *base, "--keep-gathered", keep)
        assert code == 0, err
        priced[keep] = json.loads(out)
    model = build_model(load_config(str(vlm_dir)))
    tower = sum(p.numel() for unit in (model.vision_tower, model.multi_modal_projector) for p in unit.parameters())
    tower -= sum(p.numel() for p in model.vision_tower.embeddings.parameters())
    gathered = {k: e["memory_gib"]["gathered_parameters"] for k, e in priced.items()}
    assert gathered["vision"] - gathered["none"] == pytest.approx(tower * 4 / 2**30, rel=1e-9)
    assert priced["vision"]["time_s"]["fsdp_exposed"] < priced["none"]["time_s"]["fsdp_exposed"]
    code, _, err = cli(capsys, "estimate", "qwen3-0.6b", "cpu", "--devices", 2, "--seq-len", 32,
                       "--keep-gathered", "vision")
    assert code == 2 and "keep_gathered names vision" in " ".join(err.split()), err


def test_inspect_traces_the_tower_on_images(vlm_dir, capsys):
    code, out, err = cli(capsys, "inspect", vlm_dir, "--seq-len", 32, "--images", 2, "--json")
    assert code == 0, err
    summary = json.loads(out)
    tower = summary["activation_bytes_per_token"]["vision"]
    assert summary["image_tokens"] == 8 and tower["none"] > tower["selective"] > tower["full"] > 0
    code, out, _ = cli(capsys, "inspect", vlm_dir, "--seq-len", 32)
    assert "vision (whole tower" not in out
    code, out, _ = cli(capsys, "inspect", vlm_dir, "--seq-len", 32, "--images", 2)
    assert "(whole tower," in out and "8 image tokens)" in out


def test_estimate_and_whatif_say_what_xplan_run_refuses(vlm_dir, capsys, tmp_path):
    """One declaration (xplan.layout_check.image_refusals, xplan.layout.runtime_refusals) behind
    estimate's and whatif's verdict and the runtime's check: the reasons they print are the run's."""
    from tests.test_run_cli import write_plan, xplan

    base = ["estimate", vlm_dir, "cpu", "--devices", 2, "--seq-len", 256, "--precision", "fp32", "--json"]
    code, out, err = cli(capsys, *base)
    assert code == 0 and json.loads(out)["runtime_refusals"] == [], err
    code, out, err = cli(capsys, *base, "--sp", 2, "--micro-batch", 2, "--images", 1, "--image-fraction", 0.5)
    assert code == 0, err
    (mixed,) = json.loads(out)["runtime_refusals"]  # micro_batch 2 x 1 image splits over sp 2: one reason
    assert "Ulysses sp 2 splits each micro-batch's images" in mixed
    code, out, err = cli(capsys, *base[:-1], "--sp", 2, "--micro-batch", 2, "--images", 1, "--image-fraction", 0.5)
    assert code == 0 and "refuses it" in out and "use sp 1" in " ".join(out.split()), out
    code, out, _ = cli(capsys, *base, "--tp", 2)
    assert json.loads(out)["runtime_refusals"] == ["tp = 2 is priced only (the runtime executes tp = 1)"]

    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, devices=2, fsdp=2, micro_batch=2, sp=2,
                      training={"seq_len": 256, "image_tokens": 4, "image_fraction": 0.5})
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and mixed in " ".join(err.split()), err
    code, out, err = cli(capsys, "whatif", plan, "--set", "image_fraction=1", "--json")
    assert code == 0 and json.loads(out)["runtime_refusals"] == [], err
    code, out, err = cli(capsys, "whatif", plan, "--set", "micro_batch=1", "--set", "image_fraction=1")
    assert code == 0 and "xplan run refuses the what-if layout: with sp 2" in " ".join(out.split()), out
