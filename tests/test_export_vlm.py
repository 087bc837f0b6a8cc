"""The Hugging Face export that `xplan run --checkpoint-dir` writes for a vision-language model
(the tiny InternVL of tests/test_run_vlm.py): every tensor of the run's final checkpoint, the vision
tower and projector included, with the trained values; it opens in transformers' InternVL with the
runtime's logits. At world size 2 the same from FSDP's gathered state and from ZeRO-1's fp32
masters (an a3 plan: two ranks on one package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import xplan.runtime as xr
from tests.parity_utils import max_rel_err
from tests.test_run_cli import TRAINING, run_json, write_plan
from tests.test_run_vlm import IMAGES, TINY_VLM
from xplan.layout import Layout
from xplan.plan import make_plan, save_plan
from xplan.runtime.models.hf_io import hf_state_dict

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]  # dcp.load(no_dist=True)


def checkpoint_model(config_dir: Path, step_dir: str) -> torch.nn.Module:
    """The runtime model holding the model state of a saved checkpoint (read in this process)."""
    import torch.distributed.checkpoint as dcp

    model = xr.load_model(config_dir, seed=1)  # every tensor is overwritten below
    tied = model.config.tie_word_embeddings  # the checkpoint names a tied weight once
    state = {"model": {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}}
    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    if tied:
        state["model"]["lm_head.weight"] = state["model"]["model.embed_tokens.weight"]
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def export_of(summary: dict, config_dir: Path) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The exported tensors, after checking they are exactly the final checkpoint's, and the model
    loaded from that checkpoint."""
    export = Path(summary["hf_export"])
    tensors = load_file(str(export / "model.safetensors"))
    ours = checkpoint_model(config_dir, summary["checkpoint"])
    expected = hf_state_dict(ours)
    assert sorted(tensors) == sorted(expected)
    for name in sorted(expected):
        assert torch.equal(tensors[name], expected[name]), name
    for prefix in VISION_PREFIXES:
        assert any(name.startswith(prefix) for name in tensors), prefix
    return tensors, ours


def image_batch():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(8, 128, (2, 16), generator=gen)
    ids[:, :4] = TINY_VLM["image_token_id"]  # one 56x56 image (4 tokens) at the start of each sample
    return ids, torch.randn(2, 3, 56, 56, generator=gen)


@pytest.fixture(scope="module")
def world_1(tmp_path_factory, vlm_dir):
    root = tmp_path_factory.mktemp("vlm-export")
    plan = write_plan(root / "plan.yaml", vlm_dir, training=IMAGES)
    return run_json(plan, "--steps", 2, "--checkpoint-dir", root / "ckpt")


def test_export_holds_the_trained_vision_tower_and_opens_in_transformers(world_1, vlm_dir):
    import transformers

    tensors, ours = export_of(world_1, vlm_dir)
    untrained = hf_state_dict(xr.load_model(vlm_dir, seed=0))
    vision = [name for name in tensors if name.startswith(VISION_PREFIXES)]
    assert len(vision) == sum(1 for name in untrained if name.startswith(VISION_PREFIXES))
    assert all(not torch.equal(tensors[name], untrained[name]) for name in vision)  # trained, not the init

    export = Path(world_1["hf_export"])
    assert json.loads((export / "config.json").read_text())["model_type"] == "internvl"
    ref = transformers.InternVLForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    ids, pixels = image_batch()
    with torch.no_grad():
        logits = ours(ids, pixel_values=pixels)
        assert max_rel_err(logits, ref(input_ids=ids, pixel_values=pixels).logits) <= 1e-5
        assert torch.equal(xr.load_model(export)(ids, pixel_values=pixels), logits)


@pytest.mark.parametrize("parallel", ["fsdp2-ep2", "zero1-a3-tied"])
def test_world_size_2_export_gathers_the_vision_units(world_1, vlm_dir, tmp_path, parallel):
    """FSDP: the vision tower's units (parallelize.py) gathered with the rest, here under full
    recompute of the vision layers; ZeRO-1: its fp32 masters under every state-dict name (tied
    embeddings: the export used to stop on the missing lm_head.weight)."""
    if parallel == "zero1-a3-tied":
        vlm_dir = tmp_path / "tied"
        vlm_dir.mkdir()
        (vlm_dir / "config.json").write_text(json.dumps({**TINY_VLM, "tie_word_embeddings": True}))
    if parallel == "fsdp2-ep2":
        plan = write_plan(tmp_path / "plan.yaml", vlm_dir, devices=2, fsdp=2, ep=2, vision_recompute="full",
                          training=IMAGES)
        extra = ()
    else:
        lay = Layout(devices=1, ranks_per_device=2, dp_mode="zero1", ep=2, precision="fp32",
                     kernels={"elementwise": "eager"})
        plan = save_plan(make_plan(str(vlm_dir), "a3", lay, {**TRAINING, **IMAGES}), tmp_path / "a3.yaml")
        extra = ("--device", "cpu")
    summary = run_json(plan, "--steps", 2, "--checkpoint-dir", tmp_path / "ckpt", *extra)
    assert summary["world_size"] == 2
    tensors, _ = export_of(summary, vlm_dir)
    if parallel == "zero1-a3-tied":
        assert not any("lm_head" in name for name in tensors)  # transformers ties it on load
    else:  # the model of world_1, trained alike
        reference = load_file(str(Path(world_1["hf_export"]) / "model.safetensors"))
        assert sorted(tensors) == sorted(reference)
        assert max(max_rel_err(tensors[name], reference[name]) for name in reference) <= 1e-4


def test_export_refuses_a_state_that_does_not_match_the_model(vlm_dir):
    """A tensor dropped or renamed on the way to the export stops it (it used to be skipped)."""
    from xplan.runtime.train.checkpoint import host_model

    model = xr.load_model(vlm_dir, seed=0)
    state = model.state_dict()
    with pytest.raises(RuntimeError, match=r"missing \['vision_tower\."):
        host_model(model.config, {k: v for k, v in state.items() if not k.startswith("vision_tower.")})
    with pytest.raises(RuntimeError, match=r"unexpected \['extra\.weight'\]"):
        host_model(model.config, {**state, "extra.weight": torch.zeros(1)})
    host = host_model(model.config, state)
    assert all(torch.equal(v, state[k]) for k, v in host.state_dict().items())
