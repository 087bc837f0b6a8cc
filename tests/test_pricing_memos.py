"""The cost models' memos (issue #14: search speed) never change a number: every layout priced
on a trace that has priced many others equals the same layout priced on a fresh copy."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from tests.trace_configs import tiny_config
from xplan.cost_models import estimate, memory_estimate
from xplan.cost_models.estimate import communication_terms
from xplan.cost_models.memos import layout_key
from xplan.errors import InputError
from xplan.hw_profiles import load_profile
from xplan.layout import DEFAULT_KERNELS, Layout
from xplan.planner.trace import trace_model
from xplan.planner.trace.model_trace import trace_from_json, trace_to_json


@pytest.fixture(scope="module")
def traced():
    config = tiny_config("qwen3_moe", num_hidden_layers=4)
    return config, trace_model(config, 64, use_cache=False, loss="chunked")


def layouts():
    kernels = {**DEFAULT_KERNELS, "loss": "chunked"}
    shapes = [dict(devices=16, fsdp=16, ep=4, sp=2), dict(devices=16, fsdp=8, ep=2), dict(devices=16, fsdp=1, ep=2),
              dict(devices=16, fsdp=4, tp=2, pp=2, vpp=2), dict(devices=8, fsdp=8, ep=8, sp=4)]
    combos = itertools.product(shapes, (1, 2), ("none", "selective", 0.25, "full"),
                               ((), ("optimizer",), ("activations",), ("params",)))
    for i, (shape, mb, recompute, offload) in enumerate(combos):
        yield Layout(**shape, micro_batch=mb, recompute=recompute, offload=offload,
                     precision=("bf16", "fp8")[i % 2], kernels=kernels)


def test_memoised_prices_equal_fresh_ones(traced):
    config, trace = traced
    profile = load_profile("h800")
    shared = trace_from_json(json.loads(json.dumps(trace_to_json(trace))))
    checked = 0
    for i, layout in enumerate(layouts()):
        imbalance, every_mm = ((1.0, 0), (1.3, 2), (1.0, 2), (1.3, 0))[i % 4]
        global_batch = 4 * layout.data_parallel * layout.micro_batch
        fresh = trace_from_json(json.loads(json.dumps(trace_to_json(trace))))
        for grad_accum in (1, 4):
            assert memory_estimate(shared, layout, profile, grad_accum, imbalance, config, every_mm) == \
                memory_estimate(fresh, layout, profile, grad_accum, imbalance, config, every_mm)
        a = estimate(shared, config, layout, profile, global_batch, imbalance, every_mm).to_dict()
        b = estimate(fresh, config, layout, profile, global_batch, imbalance, every_mm).to_dict()
        assert a == b, layout
        checked += 1
    assert checked == 5 * 2 * 4 * 4


def test_layout_key_sees_every_field():
    base = Layout(devices=8, fsdp=8)
    changed = [dict(devices=16, fsdp=16), dict(dp_mode="hsdp", fsdp=4), dict(dp_mode="ddp", fsdp=1), dict(ep=2),
               dict(sp=2), dict(tp=2, dp_mode="zero1", fsdp=1), dict(pp=2, dp_mode="zero1", fsdp=1),
               dict(pp=2, vpp=2, dp_mode="zero1", fsdp=1), dict(micro_batch=2), dict(recompute="full"),
               dict(offload=("optimizer",)), dict(tile_tokens=4096), dict(keep_gathered=("moe",)),
               dict(allocator="caching"), dict(precision="fp8"), dict(tp_comm="overlapped"),
               dict(ranks_per_device=2, fsdp=16), dict(ep_overlap="microbatch"), dict(grad_dtype="bf16"),
               dict(fsdp_buffers="zero_copy"), dict(vision_recompute="full"),
               dict(kernels={**DEFAULT_KERNELS, "loss": "full"})]
    assert {f for c in changed for f in c} == set(vars(base))
    keys = {layout_key(base.with_changes(**c)) for c in changed}
    assert len(keys) == len(changed) and layout_key(base) not in keys


def test_communication_terms_ignore_recompute_and_offload(traced):
    config, trace = traced
    profile = load_profile("h800")
    layout = Layout(devices=16, fsdp=8, ep=2, sp=2, micro_batch=2)
    first = communication_terms(trace, config, layout, profile)
    for change in (dict(recompute="full"), dict(offload=("optimizer", "activations")), dict(recompute=0.5),
                   dict(vision_recompute="full"),
                   dict(keep_gathered=("moe",)), dict(allocator="caching")):
        fresh = trace_from_json(json.loads(json.dumps(trace_to_json(trace))))
        assert communication_terms(fresh, config, layout.with_changes(**change), profile) == first


def test_zero_copy_fsdp_buffers_drop_only_the_fsdp2_copies(traced):
    """Megatron-FSDP (fsdp_buffers zero_copy) pays the same collectives without FSDP2's copies."""
    config, trace = traced
    profile = load_profile("h800")
    layout = Layout(devices=16, fsdp=16, ep=2)
    (blocks, root) = communication_terms(trace, config, layout, profile)
    (zblocks, zroot) = communication_terms(trace, config, layout.with_changes(fsdp_buffers="zero_copy"), profile)
    for kind, (ag, rs, copies, a2a, uly, tp, regather) in blocks.items():
        assert copies > 0 and zblocks[kind] == (ag, rs, 0.0, a2a, uly, tp, regather)
    assert root[1] > 0 and zroot == (root[0], 0.0, root[2])
    plain = estimate(trace, config, layout, profile, 64)
    zero = estimate(trace, config, layout.with_changes(fsdp_buffers="zero_copy"), profile, 64)
    assert zero.time["fsdp_copies"] == 0.0 < plain.time["fsdp_copies"]
    assert zero.step_time_s == pytest.approx(plain.step_time_s - plain.time["fsdp_copies"])


def test_one_pricing_context_prices_as_fresh_estimates(traced):
    """A search's PricingContext (summed off) across every layout - op times shared across rank
    works and traces, the step terms' layout check and activation copy times once per key - gives
    each estimate's numbers as a fresh context on a fresh trace does."""
    from xplan.cost_models import PricingContext

    config, trace = traced
    profile = load_profile("h800")
    pricing = PricingContext(profile)
    other = trace_model(config, 64, use_cache=False, loss="full")
    for i, layout in enumerate(layouts()):
        imbalance, every_mm = ((1.0, 0), (1.3, 2), (1.0, 2), (1.3, 0))[i % 4]
        global_batch = 4 * layout.data_parallel * layout.micro_batch
        fresh = trace_from_json(json.loads(json.dumps(trace_to_json(trace))))
        shared = estimate(trace, config, layout, profile, global_batch, imbalance, every_mm, pricing=pricing)
        assert shared.to_dict() == estimate(fresh, config, layout, profile, global_batch, imbalance,
                                            every_mm).to_dict(), layout
        estimate(other, config, layout, profile, global_batch, imbalance, every_mm, pricing=pricing)


@pytest.mark.parametrize("summed", [False, True])
def test_shared_op_times_equal_each_works_own(traced, summed):
    """`OpTimes`: an op priced under one rank work serves every work that differs only in what the
    op does not read (EP fields for all but grouped GEMMs), and equal ops of two traces share it."""
    from xplan.cost_models import PricingContext
    from xplan.cost_models.compute import RankWork, group_times, group_times_summed

    config, trace = traced
    profile = load_profile("h800")
    other = trace_model(config, 64, use_cache=False, loss="full")
    pricing = PricingContext(profile, summed=summed)
    alone = group_times_summed if summed else group_times
    works = [RankWork(token_factor=tf, ep=ep, imbalance=imbalance, moe_gemm=gemm, precision=precision, seq_len=64,
                      recompute_every_mm=every_mm, fused_loss=fused)
             for tf, ep, imbalance, gemm, precision, every_mm, fused in itertools.product(
                 (1.0, 0.5), (1, 2, 4), (1.0, 1.3), ("grouped_mm", "loop"), ("bf16", "fp8"), (0, 2), (False, True))]
    for work in works:
        for t in (trace, other):
            assert pricing.group_times(t, work) == alone(t, work, profile), (work, t is trace)


def test_variants_equal_validated_layouts():
    """`Variants.of` (a copy of the validated core layout) equals `with_changes` (validated anew)."""
    from xplan.planner.search import OFFLOAD_ORDER, RECOMPUTE_ORDER, TILE_TOKENS
    from xplan.planner.search_bounds import Variants

    variants = Variants()
    for base in (Layout(devices=16, fsdp=16, ep=4, sp=2, micro_batch=2), Layout(devices=16, fsdp=8, ep=2),
                 Layout(devices=16, fsdp=1, tp=2, pp=2, dp_mode="zero1")):
        for recompute, offload, keep, tile in itertools.product(RECOMPUTE_ORDER, OFFLOAD_ORDER,
                                                                 ((), ("moe",), ("dense", "moe")), (None, *TILE_TOKENS)):
            changes = dict(recompute=recompute, offload=offload, keep_gathered=keep, tile_tokens=tile)
            try:
                validated = base.with_changes(**changes)
            except InputError as exc:  # tiles with selective recompute: refused the same way
                with pytest.raises(InputError, match=re.escape(str(exc))):
                    variants.of(base, **changes)
                continue
            made = variants.of(base, **changes)
            assert made == validated and layout_key(made) == layout_key(validated)
            assert made.model_dump() == validated.model_dump()
    base = Layout(devices=8, fsdp=8)
    assert variants.of(base, offload=["optimizer"]) == base.with_changes(offload=("optimizer",))
    with pytest.raises(ValueError, match="varied by copy"):
        variants.of(Layout(devices=8, fsdp=8), ep=2)
