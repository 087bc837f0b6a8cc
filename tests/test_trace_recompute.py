"""Recompute policies (runtime/recompute.py): same gradients under every policy, idempotent
application, and the selective save list."""

from __future__ import annotations

import pytest
import torch

from tests.trace_configs import family_available, tiny_config
from xplan.runtime import build_model
from xplan.runtime.recompute import (
    RECOMPUTE_POLICIES,
    apply_recompute,
    recompute_policy,
    selective_saves,
)
from xplan.runtime.train.loss import token_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def grads(family: str, policy: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = build_model(tiny_config(family), torch.float32, "cpu", seed=3)
    for layer in model.model.layers:
        apply_recompute(layer, policy)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    loss = token_loss_sum(model, ids, torch.roll(ids, -1, dims=1), kind="full")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("deepseek_v3", marks=pytest.mark.skipif(
    not family_available("deepseek_v3"), reason="DeepSeek-V3 runtime not present"))])
def test_policies_give_identical_gradients(family):
    loss0, ref = grads(family, "none")
    for policy in ("selective", "full"):
        loss, got = grads(family, policy)
        assert torch.equal(loss, loss0)
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{policy} {name}")


def test_apply_recompute_is_idempotent_and_reversible():
    model = build_model(tiny_config("qwen3"), torch.float32, "cpu")
    layer = model.model.layers[0]
    names = [n for n, _ in model.named_parameters()]
    assert recompute_policy(layer) == "none"
    for policy in ("full", "selective", "selective", "full"):
        apply_recompute(layer, policy)
        assert recompute_policy(layer) == policy
    apply_recompute(layer, "none")
    assert recompute_policy(layer) == "none" and "forward" not in layer.__dict__
    assert [n for n, _ in model.named_parameters()] == names  # no wrapper module in the names
    with pytest.raises(ValueError):
        apply_recompute(layer, "half")
    assert set(RECOMPUTE_POLICIES) == {"none", "selective", "full"}


def test_selective_save_list():
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert selective_saves(op)
    for op in (aten.add.Tensor, aten.mul.Tensor, aten.silu.default, aten.rsqrt.default, aten.topk.default):
        assert not selective_saves(op)
    x = torch.zeros(2)
    assert not selective_saves(aten._to_copy.default, (x,), {"dtype": torch.float16})
    assert not selective_saves(aten._to_copy.default, (x,), {"device": torch.device("cpu")})
