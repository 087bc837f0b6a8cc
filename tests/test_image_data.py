"""`training.data.kind: image_jsonl`: local image + text samples (.npy / .pt images, token ids) for
the tiny InternVL-style model of test_run_vlm: `xplan run` trains on them (losses go down), world
size 2 (EP 2 x FSDP 2, two micro-batches per rank) trains exactly like one process, and bad data
exits 2 with a message before any worker starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_run_cli import TINY_MOE, run_json, write_plan, xplan
from tests.test_run_vlm import IMAGES
from xplan.runtime.train.image_data import IMAGENET_MEAN, IMAGENET_STD, build_image_data, load_image

pytestmark = pytest.mark.usefixtures("one_thread")


def make_dataset(folder, samples=8, seed=0):
    """`samples` lines of two images each (raw uint8 56x56, raw uint8 40x72 to resize, normalised
    float 3x56x56 in .pt), with texts shorter and longer than the 25 tokens after the images."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(samples):
        raw = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
        np.save(folder / "img" / f"{k}a.npy", raw)
        if k % 2:
            np.save(folder / "img" / f"{k}b.npy", rng.integers(0, 256, size=(40, 72, 3), dtype=np.uint8))
            second = f"img/{k}b.npy"
        else:
            torch.save(torch.from_numpy(rng.standard_normal((3, 56, 56)).astype(np.float32)), folder / "img" / f"{k}b.pt")
            second = f"img/{k}b.pt"
        length = 12 + 5 * k  # 12 .. 47: padded and truncated texts
        text = [10 + (7 * k + 3 * i) % 100 for i in range(length)]
        lines.append({"images": [f"img/{k}a.npy", second], "input_ids": text})
    path = folder / "samples.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def spec(vlm_dir):
    from xplan.runtime import load_config

    return load_config(str(vlm_dir)).vision_spec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("images"))


def image_training(path, **extra):
    return {**IMAGES, "data": {"kind": "image_jsonl", "path": str(path)}, **extra}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, vlm_dir, dataset):
    root = tmp_path_factory.mktemp("image-baseline")
    return run_json(write_plan(root / "plan.yaml", vlm_dir, training=image_training(dataset)), "--steps", 20)


def test_trains_on_local_image_text_samples(baseline, dataset):
    losses = baseline["losses"]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # the loss goes down


def test_world_2_ep2_fsdp2_matches_world_1(baseline, vlm_dir, dataset, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, devices=2, fsdp=2, ep=2, micro_batch=1,
                      training=image_training(dataset))
    summary = run_json(plan, "--steps", 20)
    assert summary["world_size"] == 2
    ref = baseline["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], ref, strict=True)) <= 1e-5


def test_resume_is_exact(baseline, vlm_dir, dataset, tmp_path):
    """Resuming needs only the step: the samples after it are the uninterrupted run's."""
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, training=image_training(dataset))
    ckpt = tmp_path / "ckpt"
    first = run_json(plan, "--steps", 6, "--checkpoint-dir", ckpt, "--checkpoint-every", 6)
    second = run_json(plan, "--steps", 10, "--checkpoint-dir", ckpt, "--resume")
    assert second["start_step"] == 6
    assert first["losses"] + second["losses"] == baseline["losses"][:10]  # bit-exact


def test_samples_images_first_padding_ignored(dataset, spec):
    """Placeholders first, then the text (truncated / padded); labels of placeholders and padding
    ignored; the normaliser counts text tokens only; the same rows on any data-parallel split."""
    source = build_image_data(dataset, 32, 8, spec, 128, seed=0)
    one = source.rank_micro_batches(3, 4, 4, 0, 1)[0]
    two = [b for r in range(2) for b in source.rank_micro_batches(3, 4, 1, r, 2)]
    assert torch.equal(torch.cat([b.input_ids for b in two]), one.input_ids)
    assert torch.equal(torch.cat([b.labels for b in two]), one.labels)
    assert torch.equal(torch.cat([b.pixel_values for b in two]), one.pixel_values)
    assert one.pixel_values.shape == (8, 3, 56, 56)
    images = [load_image(p, spec) for i in range(12, 16) for p in source._sample(i).images]
    assert torch.equal(one.pixel_values, torch.stack(images))  # each sample's own images, in order
    assert (one.input_ids[:, :8] == spec.image_token_id).all() and (one.input_ids[:, 8:] != spec.image_token_id).all()
    assert (one.labels[:, :7] == -100).all()
    texts = [source._text(source._sample(i)) for i in range(12, 16)]
    for row, text in enumerate(texts):
        assert one.labels[row, 7: 7 + len(text)].tolist() == list(text)
        assert (one.labels[row, 7 + len(text):] == -100).all()
    assert source.step_label_tokens(3, 4) == sum(map(len, texts)) == int((one.labels != -100).sum())
    lengths = [len(source._text(s)) for s in source.samples]  # 25 tokens fit after the images
    assert min(lengths) < 25 and max(lengths) == 25 and max(len(s.text) for s in source.samples) > 25


def test_image_preprocessing(tmp_path, spec):
    white = np.full((28, 84, 3), 255, dtype=np.uint8)  # resized to 56x56 (bicubic), then normalised
    np.save(tmp_path / "w.npy", white)
    x = load_image(tmp_path / "w.npy", spec)
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 56, 56), atol=1e-5)
    ready = torch.randn(3, 56, 56, dtype=torch.float64)  # normalised values pass through
    np.save(tmp_path / "r.npy", ready.numpy())
    assert torch.equal(load_image(tmp_path / "r.npy", spec), ready.float())


def write_lines(folder, lines):
    path = folder / "bad.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing file", "does not exist"),
    ("missing image", "does not exist"),
    ("grey image", "has shape (56, 56) and dtype uint8"),
    ("float hwc", "has shape (56, 56, 3) and dtype float32"),
    ("png", "must be a .npy or .pt array"),
    ("garbage pt", "cannot read image"),
    ("pickled object pt", "not a tensor file written by torch.save"),
    ("one image", "has 1 image(s), but training.image_tokens 8 is 2 image(s) of 4 tokens"),
    ("image token in text", "holds the image token id 3"),
    ("out of vocabulary", "outside the model's vocabulary [0, 128)"),
    ("not json", "is not valid JSON"),
    ("no image tokens", "needs training.image_tokens"),
    ("jsonl with image tokens", "set training.data.kind: synthetic or image_jsonl"),
])
def test_bad_image_data_exits_2(vlm_dir, tmp_path, case, message):
    np.save(tmp_path / "ok.npy", np.zeros((56, 56, 3), dtype=np.uint8))
    good = {"images": ["ok.npy", "ok.npy"], "input_ids": [5, 6, 7]}
    training = None
    if case == "missing file":
        path = tmp_path / "nope.jsonl"
    elif case == "missing image":
        path = write_lines(tmp_path, [good, {**good, "images": ["ok.npy", "gone.npy"]}])
    elif case in ("grey image", "float hwc"):
        np.save(tmp_path / "x.npy", np.zeros((56, 56), np.uint8) if case == "grey image"
                else np.zeros((56, 56, 3), np.float32))
        path = write_lines(tmp_path, [{**good, "images": ["ok.npy", "x.npy"]}])
    elif case == "png":
        path = write_lines(tmp_path, [{**good, "images": ["ok.npy", "x.png"]}])
    elif case.endswith(" pt"):
        if case.startswith("garbage"):
            (tmp_path / "x.pt").write_bytes(b"not a torch file")
        else:  # a pickle that would run code on load: refused, and no advice to load it unsafely
            torch.save({"pixels": torch.zeros(3, 56, 56), "loader": print}, tmp_path / "x.pt")
        path = write_lines(tmp_path, [{**good, "images": ["ok.npy", "x.pt"]}])
    elif case == "one image":
        path = write_lines(tmp_path, [good, {"image": "ok.npy", "input_ids": [5]}])
    elif case == "image token in text":
        path = write_lines(tmp_path, [{**good, "input_ids": [5, 3, 7]}])
    elif case == "out of vocabulary":
        path = write_lines(tmp_path, [{**good, "input_ids": [5, 128]}])
    elif case == "not json":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"images": ["ok.npy"]\n')
    elif case == "no image tokens":
        path = write_lines(tmp_path, [good])
        training = {"data": {"kind": "image_jsonl", "path": str(path)}}
    else:
        path = write_lines(tmp_path, [[5, 6, 7] * 20])
        training = {**IMAGES, "data": {"kind": "jsonl", "path": str(path)}}
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, training=training or image_training(path))
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and message in " ".join(err.split()), err  # rich wraps long lines
    assert "Traceback" not in err and "weights_only` set to `False`" not in err


def test_image_data_needs_a_vision_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_MOE))
    path = write_lines(tmp_path, [{"image": "ok.npy", "input_ids": [5, 6]}])
    plan = write_plan(tmp_path / "plan.yaml", tmp_path / "m", training={"data": {"kind": "image_jsonl",
                                                                               "path": str(path)}})
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and "not a vision-language model" in " ".join(err.split()), err


def test_relative_paths_from_the_plan_folder(vlm_dir, tmp_path, monkeypatch):
    """A relative data path is read from the plan's folder; image paths from the data file's."""
    make_dataset(tmp_path / "data", samples=2)
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, training=image_training("data/samples.jsonl"))
    monkeypatch.chdir(tmp_path / "data" / "img")
    summary = run_json(plan, "--steps", 2)
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))


def test_pt_images_load_mapped_or_whole(tmp_path):
    """A .pt in torch's zip format is memory-mapped (the pre-spawn check reads its header); a legacy
    (pre-zip) file cannot be, and is read whole: both give the saved tensor."""
    from xplan.runtime.train.image_data import _raw_array

    pixels = torch.rand(3, 8, 8)
    torch.save(pixels, tmp_path / "zip.pt")
    torch.save(pixels, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(_raw_array(tmp_path / name), pixels)
