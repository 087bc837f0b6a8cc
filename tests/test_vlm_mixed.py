"""Mixed image / text batches (`training.image_fraction` < 1) on the tiny InternVL-style model of
test_run_vlm (CPU, fp32, gloo): which samples carry images (`data.carries_images`), their rows,
labels and token counts, training on synthetic and on image_jsonl data with text-only samples, a
world-2 run whose rank 0 never sees an image while rank 1 always does (the vision tower's FSDP2
collectives must still match: `models.vision.zero_rows`) equal to world 1, the dry run measuring
the micro-batch of image samples, and the refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.test_image_data import make_dataset
from tests.test_run_cli import run_json, write_plan, xplan

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = {"image_tokens": 8, "image_fraction": 0.5}  # two 4-token images on every other 32-token sample


@pytest.fixture(scope="module")
def spec(vlm_dir):
    from xplan.runtime import load_config

    return load_config(str(vlm_dir)).vision_spec


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3, 0.05, 1 / 3])
def test_carries_images_rule(fraction):
    from xplan.runtime.train.data import carries_images, image_sample_count

    picked = [carries_images(i, fraction) for i in range(10_000)]
    assert abs(sum(picked) / len(picked) - fraction) <= 1e-4  # the share, evenly spread
    assert all(picked) if fraction == 1 else not picked[0]
    for start, stop in ((0, 10_000), (7, 8), (123, 4567), (9_990, 10_000)):
        assert image_sample_count(start, stop, fraction) == sum(picked[start:stop])
    gaps = np.diff(np.flatnonzero(picked))  # never two image samples closer than 1/f apart, minus one
    assert gaps.min() >= int(1 / fraction) and gaps.max() <= -(-1 // fraction)


def test_synthetic_rows_labels_and_token_counts(spec):
    from xplan.runtime.train.data import SyntheticData, carries_images, image_micro_batches, step_tokens

    source = SyntheticData(128, 32, 0, 8, spec, 0.5)
    step, batch = 3, 4
    first = step * batch
    one = image_micro_batches(source.windows(range(first, first + 4)), first, 2, spec, 8, 0, fraction=0.5)
    two = [b for r in range(2) for b in image_micro_batches(source.windows(range(first + 2 * r, first + 2 * r + 2)),
                                                            first + 2 * r, 1, spec, 8, 0, fraction=0.5)]
    ids = torch.cat([b.input_ids for b in one])
    assert torch.equal(ids, torch.cat([b.input_ids for b in two]))  # any data-parallel split: the same rows
    assert torch.equal(torch.cat([b.pixel_values for b in one]), torch.cat([b.pixel_values for b in two]))
    carries = [carries_images(i, 0.5) for i in range(first, first + 4)]
    assert carries == [False, True, False, True]
    assert [b.pixel_values.shape[0] for b in two] == [0, 2, 0, 2]  # image-less micro-batches: zero rows
    for row, has in enumerate(carries):
        image = ids[row] == spec.image_token_id
        assert image[:8].all() == has and not image[8:].any() and (has or not image.any())
    labels = torch.cat([b.labels for b in one])
    assert (labels != -100).sum(1).tolist() == [32, 25, 32, 25]  # text only: every token a label
    assert step_tokens(source, step, batch, 32, 8) == int((labels != -100).sum()) == 114


def test_half_image_samples_train(vlm_dir, tmp_path):
    summary = run_json(write_plan(tmp_path / "plan.yaml", vlm_dir, training=HALF), "--steps", 20)
    losses = summary["losses"]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2  # the loss goes down
    assert summary["tokens_per_step"] == 2 * 25 + 2 * 32  # two image samples, two text-only ones


def test_ranks_without_images_match_world_1(vlm_dir, tmp_path):
    """Global batch 2 at image fraction 0.5: sample 2s is text only, 2s + 1 carries images. World 1
    runs both in one micro-batch (one image sample); at world 2 rank 0 has no image in any step and
    runs the vision tower on zero rows, rank 1 on two images; the vision layers recompute (their
    checkpoints run the zero-row path too). Skipping the tower on rank 0 leaves rank 1 in the
    vision units' collectives: the run fails (measured: gloo's connection reset at the timeout)."""
    training = {**HALF, "global_batch": 2}
    single = run_json(write_plan(tmp_path / "one.yaml", vlm_dir, micro_batch=2, training=training), "--steps", 8)
    plan = write_plan(tmp_path / "two.yaml", vlm_dir, devices=2, fsdp=2, ep=2, micro_batch=1,
                      vision_recompute="full", training=training)
    summary = run_json(plan, "--steps", 8, "--timeout", 60)
    assert summary["world_size"] == 2
    ref = single["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], ref, strict=True)) <= 1e-5


def test_image_jsonl_with_text_only_samples(vlm_dir, tmp_path, spec, caplog):
    from xplan.runtime.train.image_data import build_image_data

    path = make_dataset(tmp_path, samples=6)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    texts = [{"input_ids": [10 + (5 * k + i) % 90 for i in range(20 + 9 * k)]} for k in range(4)]  # 20 .. 47 tokens
    texts[1]["images"] = []  # an empty list is text only too
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(doc) for doc in lines + texts) + "\n")  # 6 of 10 carry images

    source = build_image_data(mixed, 32, 8, spec, 128, seed=0, image_fraction=0.6)
    assert source.image_share() == 0.6
    for step in range(3):
        batch = source.rank_micro_batches(step, 4, 4, 0, 1)[0]
        samples = [source._sample(i) for i in range(4 * step, 4 * step + 4)]
        assert batch.pixel_values.shape[0] == 2 * sum(bool(s.images) for s in samples)
        for row, sample in enumerate(samples):
            text = source._text(sample)
            if sample.images:  # placeholders, then the text: the last placeholder predicts its first token
                assert (batch.input_ids[row, :8] == spec.image_token_id).all()
                assert batch.labels[row, 7: 7 + len(text)].tolist() == list(text)
                assert (batch.labels[row, :7] == -100).all() and (batch.labels[row, 7 + len(text):] == -100).all()
            else:  # text from position 0, at most seq_len + 1 tokens, the first one never a label
                assert len(text) == min(len(sample.text), 33) and (batch.input_ids[row] != spec.image_token_id).all()
                assert batch.input_ids[row, : len(text)].tolist() == list(text[:32])
                assert batch.labels[row, : len(text) - 1].tolist() == list(text[1:])
                assert (batch.labels[row, len(text) - 1:] == -100).all()
        assert source.step_label_tokens(step, 4) == int((batch.labels != -100).sum())

    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, training={**HALF, "data": {"kind": "image_jsonl",
                                                                                 "path": str(mixed)}})
    with caplog.at_level(logging.INFO, logger="xplan.runtime"):
        summary = run_json(plan, "--steps", 10)
    losses = summary["losses"]
    assert len(losses) == 10 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "image samples" in r.getMessage()]
    assert warned and "(0.600) differs from training.image_fraction (0.5)" in warned[0]  # priced at 0.5


def test_dry_run_measures_a_micro_batch_of_image_samples(vlm_dir, tmp_path):
    peaks = []
    for fraction in (1.0, 0.25):
        plan = write_plan(tmp_path / f"plan-{fraction}.yaml", vlm_dir, devices=2, fsdp=2, micro_batch=2,
                          training={**HALF, "image_fraction": fraction})
        code, out, err = xplan("run", plan, "--dry-run", "--json")
        assert code == 0, err
        peaks.append(json.loads(out)["measured_peak_gib"])
    assert peaks[0] == peaks[1] > 0


@pytest.mark.parametrize("case, message", [
    ("no image tokens", "training.image_tokens is 0"),
    ("ulysses", "use sp 1"),
    ("text-only line at fraction 1", "samples.jsonl:2 must name its images"),
    ("one-token text-only sample", "samples.jsonl:2 is a text-only sample of 1 token"),
])
def test_refusals_exit_2(vlm_dir, tmp_path, case, message):
    layout, training = {}, dict(HALF)
    if case == "no image tokens":
        training = {"image_fraction": 0.5}
    elif case == "ulysses":
        layout = {"devices": 2, "fsdp": 2, "sp": 2, "micro_batch": 2}
    else:
        np.save(tmp_path / "a.npy", np.zeros((56, 56, 3), dtype=np.uint8))
        good = {"images": ["a.npy", "a.npy"], "input_ids": [5, 6, 7]}
        lines = [good, {"input_ids": [5, 6]}] if case.startswith("text-only") else [good, {"input_ids": [5]}]
        (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        training["data"] = {"kind": "image_jsonl", "path": str(tmp_path / "samples.jsonl")}
        if case.startswith("text-only"):
            training["image_fraction"] = 1.0
    plan = write_plan(tmp_path / "plan.yaml", vlm_dir, training=training, **layout)
    code, _, err = xplan("run", plan, "--steps", 1)
    assert code == 2 and message in " ".join(err.split()), err  # rich wraps long lines
    assert "Traceback" not in err
