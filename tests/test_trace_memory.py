"""Saved-activation bytes from the fake-tensor trace against a real CPU forward of the same small model.

The real side is measured two independent ways:
- torch's memory tracker (`torch.distributed._tools.mem_tracker.MemTracker`): activation bytes
  alive after the forward (with the logits dropped), for every recompute policy;
- saved-tensor hooks: unique non-parameter storages autograd packs (policy 'none' only: under
  checkpointing autograd packs placeholders, and what is kept lives in the checkpoint's frames).
"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from tests.trace_configs import TINY, family_available, tiny_config
from xplan.planner.trace import trace_model
from xplan.runtime import build_model
from xplan.runtime.recompute import RECOMPUTE_POLICIES, apply_recompute
from xplan.runtime.train.loss import token_loss_sum

BATCH, SEQ = 2, 32


pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(not family_available(f), reason=f"{f} runtime not present"))
            for f in TINY]


def real_model(family: str, dtype: torch.dtype, policy: str):
    model = build_model(tiny_config(family), dtype, "cpu")
    for layer in model.model.layers:
        apply_recompute(layer, policy)
    return model


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["qwen3"]["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, TINY["qwen3"]["vocab_size"], (BATCH, SEQ), generator=gen)
    return ids, labels


def memtracker_saved_bytes(model, ids, labels, loss_kind: str = "full") -> int:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        ids, labels = ids.clone(), labels.clone()  # made under the tracker, as the trace does
        loss = token_loss_sum(model, ids, labels, kind=loss_kind)
        del ids, labels
        snapshot = tracker.get_tracker_snapshot("current")
    loss.backward()  # the recompute policies must also run backward on the real model
    return snapshot[torch.device("cpu")][_MemRefType.ACT]


def hooks_saved_bytes(model, ids, labels) -> int:
    """Unique storages autograd packed that are still alive once the forward is done (a node whose
    output does not reach the loss is freed with what it saved)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in seen:
            # Holding the weak reference keeps the key unique while we look.
            seen[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = token_loss_sum(model, ids, labels, kind="full")
    alive = sum(nbytes for ref, nbytes in seen.values() if not ref.expired())
    loss.backward()
    return alive


CASES = [pytest.param(f, torch.bfloat16, id=f"{f}-bf16", marks=p.marks) for f, p in zip(TINY, FAMILIES, strict=True)]
CASES += [pytest.param(f, torch.float32, id=f"{f}-fp32", marks=p.marks)  # fp32 grouped GEMM path
          for f, p in zip(TINY, FAMILIES, strict=True) if f in ("qwen3_moe", "deepseek_v3")]


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_saved_bytes_match_real_forward(family, dtype):
    trace = trace_model(tiny_config(family), SEQ, micro_batch=BATCH, dtype=dtype, use_cache=False)
    ids, labels = batch()
    for policy in RECOMPUTE_POLICIES:
        real = memtracker_saved_bytes(real_model(family, dtype, policy), ids, labels)
        assert trace.saved_bytes(policy) == pytest.approx(real, rel=0.01), policy
    real_hooks = hooks_saved_bytes(real_model(family, dtype, "none"), ids, labels)
    # The trace also counts the loss scalar, which is alive but not saved.
    assert trace.saved_bytes("none") == pytest.approx(real_hooks, rel=0.01)


@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_saved_bytes_match_real_forward_chunked_loss(family):
    dtype = torch.bfloat16
    trace = trace_model(tiny_config(family), SEQ, micro_batch=BATCH, dtype=dtype, loss="chunked", use_cache=False)
    ids, labels = batch()
    for policy in ("none", "full"):
        real = memtracker_saved_bytes(real_model(family, dtype, policy), ids, labels, loss_kind="chunked")
        assert trace.saved_bytes(policy) == pytest.approx(real, rel=0.01), policy


def test_policies_order_and_full_keeps_block_input():
    trace = trace_model(tiny_config("qwen3_moe"), SEQ, micro_batch=BATCH, use_cache=False)
    hidden = TINY["qwen3_moe"]["hidden_size"]
    for block in trace.blocks.values():
        saved = block.saved_bytes
        assert saved["full"] < saved["selective"] < saved["none"]
        assert saved["full"] == BATCH * SEQ * hidden * 2  # only the bf16 block input
        assert block.recompute_flops["full"] == block.flops_forward
        assert block.recompute_flops["none"] == 0
        assert 0 <= block.recompute_flops["selective"] < block.flops_forward
    # Embedding and head (with the loss) do not depend on the block policy.
    for group in trace.others.values():
        assert len(set(group.saved_bytes.values())) == 1


def test_saved_bytes_per_token_scale_with_micro_batch():
    one = trace_model(tiny_config("qwen3"), SEQ, micro_batch=1, use_cache=False)
    two = trace_model(tiny_config("qwen3"), SEQ, micro_batch=2, use_cache=False)
    for policy in RECOMPUTE_POLICIES:
        assert two.blocks["dense"].saved_bytes[policy] == 2 * one.blocks["dense"].saved_bytes[policy]
