"""Issue #20's acceptance at full size: the planner's memory prediction for Intern-S1 with image
tokens agrees with `xplan run --dry-run` within 3%, on h800 and on a3 (three copies of each
repeated block pattern run, extrapolated). The search's own picks agree as closely (measured when
this test was written: h800 with 2048 image tokens 80.09 GiB measured vs 79.92 predicted; a3 with
1024, recompute 0.75 and parameter offload 74.25 vs 74.13); these layouts run faster.

The peak is the head's backward, where the vision tower's activations are still alive. Two
mechanisms meet there: (1) the vision tower's patch embeddings and projector are FSDP units of
their own, resharded after their forward (in the root unit they stayed gathered through the step,
the [1, 1025, 3200] position embeddings padded to 256 rows by FSDP2's dim-0 sharding: 1.7 GiB the
planner did not price); (2) the head unit (final norm + LM head) is gathered again for the norm's
backward, beside the head's fp32 reduce-scatter input (`cost_models.memory.chunked_head_moments`),
which the planner priced as the loss's moment (three head weights and a chunk of logits, all
temporaries)."""

from __future__ import annotations

import pytest

from xplan.layout import Layout

GIB = 2**30
MODEL = "intern-s1"
HEAD_WEIGHT = 153216 * 4096 * 2  # Intern-S1's LM head in bf16


def _dry_run(hardware: str, layout: Layout, image_tokens: int):
    from xplan.app.dryrun_compare import compare_dry_run
    from xplan.plan import make_plan

    plan = make_plan(MODEL, hardware, layout, {"seq_len": 4096, "global_batch": 256, "image_tokens": image_tokens})
    return compare_dry_run(plan, layers=3, reprice=True)


@pytest.mark.parametrize(("hardware", "layout", "image_tokens"), [
    # 1024 image tokens per 4096-token sample, FSDP over 256 ranks, EP 16, full recompute: fits both
    # (`xplan estimate`: 49.0 GiB allocated of 80 on h800, of 64 per die on a3, without vision
    # recompute). One trace serves both; each checks one vision recompute policy (activations at
    # the peak on h800, measured: 33.9 GiB without vision recompute, 15.2 selective, 4.2 full).
    # h800 also keeps the tower gathered (keep_gathered vision: its layers and projector, 10.4 GiB).
    ("h800", Layout(devices=256, fsdp=256, ep=16, micro_batch=1, recompute="full", vision_recompute="full",
                    keep_gathered=("vision",)), 1024),
    # a3: 256 ranks, two per 910C package.
    ("a3", Layout(devices=128, ranks_per_device=2, fsdp=256, ep=16, micro_batch=1, recompute="full",
                  vision_recompute="selective"), 1024),
])
def test_intern_s1_dry_run_agrees_with_the_prediction(hardware, layout, image_tokens):
    result = _dry_run(hardware, layout, image_tokens)
    components = result.to_dict()["components"]
    assert abs(result.error) <= 0.03, components
    # Component by component at the head's backward: two head weights gathered (and the kept tower),
    # the head's fp32 reduce-scatter input, the hidden-state gradient.
    assert result.report.peak_phase == "backward"
    # Kept: all but the patch embeddings; FSDP2 pads the rows 256 ranks do not divide (InternViT-6B's
    # 9600-row qkv, 3200-row o_proj: about 1% of the kept tower).
    tower = 5_600_567_808 * 2 if "vision" in layout.keep_gathered else 0
    assert components["gathered_parameters"]["measured"] * GIB <= (2 * HEAD_WEIGHT + tower * 1.015) * 1.001, components
    for name in ("gathered_parameters", "temporaries", "activations"):
        part = components[name]
        assert part["predicted"] == pytest.approx(part["measured"], rel=0.03), (name, components)
