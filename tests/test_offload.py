"""Host offload on CPU: the same code path as on CUDA, run synchronously (no side stream).

- activation offload (`ActivationOffload`) under every recompute policy gives the gradients of a
  run without it, bit for bit; what moves is what the policy leaves to autograd (full: the block
  inputs; none: every saved tensor but parameters and the shared rotary tables); the last block
  stays; every host copy is released by the end of the backward, and one block's copies are
  released once the next block's forward is done;
- optimizer-state offload keeps the AdamW moments out of device storage between steps and gives
  the same updates; a checkpoint sees them resident;
- the allocator option is set (or an explicit environment choice kept).
"""

from __future__ import annotations

import pytest
import torch

from tests.trace_configs import tiny_config
from xplan.layout import Layout
from xplan.runtime import build_model
from xplan.runtime.distributed.offload import (
    ActivationOffload,
    OffloadLabels,
    OptimizerStateOffload,
    apply_activation_offload,
    apply_optimizer_offload,
)
from xplan.runtime.recompute import apply_recompute


class Recorder(OffloadLabels):
    """Counts host bytes alive (weakly: a host copy released is a host copy freed)."""

    def __init__(self):
        import weakref

        self.alive = weakref.WeakSet()
        self.restored_count = 0
        super().__init__(host=self.alive.add, restored=self._restored)

    def _restored(self, tensor):
        self.restored_count += 1

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.alive)


def _model(policy: str, family: str = "qwen3_moe"):
    model = build_model(tiny_config(family, num_hidden_layers=4), seed=0)
    for block in model.model.layers:
        apply_recompute(block, policy)
    return model


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_activation_offload_gives_the_same_gradients(policy):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = _grads(_model(policy), ids)
    model = _model(policy)
    labels = Recorder()
    ActivationOffload(list(model.model.layers), "cpu", labels)
    for _ in range(2):  # a second pass reuses the hooks (the next micro-batch)
        got = _grads(model, ids)
        assert got.keys() == reference.keys()
        for name, grad in reference.items():
            assert torch.equal(got[name], grad), name
    assert labels.host_bytes() == 0  # every host copy released after the backward
    assert labels.restored_count > 0


def test_full_recompute_moves_the_block_inputs_but_the_last():
    model = _model("full")
    labels = Recorder()
    offload = ActivationOffload(list(model.model.layers), "cpu", labels)
    ids = torch.randint(0, 128, (2, 16))
    logits = model(ids)
    hidden = model.config.hidden_size
    # Blocks 0..2 moved one input each (hidden states, fp32); the rotary tables stayed.
    assert labels.host_bytes() == 3 * 2 * 16 * hidden * 4
    assert [g.offloaded for g in offload.groups.values()] == [True, True, True, False]
    assert all(len(g.entries) == 1 for g in offload.groups.values())
    # Released on the device once the next block's forward finished (the last group stays).
    assert [any(e.device is not None for e in g.entries) for g in offload.groups.values()] == [False] * 3 + [True]
    logits.sum().backward()
    assert labels.host_bytes() == 0


def test_apply_activation_offload_follows_the_layout():
    model = _model("full")
    layout = Layout(devices=1, offload=("activations",))
    assert apply_activation_offload(list(model.model.layers), Layout(devices=1), "cpu") is None
    assert isinstance(apply_activation_offload(list(model.model.layers), layout, "cpu"), ActivationOffload)


def _steps(model, optimizer, ids, steps=3):
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(ids).float().pow(2).mean().backward()
        optimizer.step()


def test_optimizer_state_offload_keeps_moments_off_the_device_and_the_same_updates():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = build_model(tiny_config("qwen3"), seed=0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=True)
    _steps(ref, ref_opt, ids)
    model = build_model(tiny_config("qwen3"), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    labels = Recorder()
    offload = apply_optimizer_offload(optimizer, Layout(devices=1, offload=("optimizer",)), "cpu", labels=labels)
    assert isinstance(offload, OptimizerStateOffload)
    _steps(model, optimizer, ids)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert all(m.untyped_storage().size() == 0 for m in moments)  # between steps: nothing on the device
    assert labels.host_bytes() == sum(m.numel() * m.element_size() for m in moments)
    with offload.resident():
        ref_moments = [s[k] for s in ref_opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
        for got, want in zip(moments, ref_moments, strict=True):
            assert torch.equal(got, want)
    assert all(m.untyped_storage().size() == 0 for m in moments)
    # params offload goes through FSDP2 instead; nothing to do here
    assert apply_optimizer_offload(optimizer, Layout(devices=1, offload=("optimizer", "params")), "cpu") is None


def test_allocator_setting_respects_the_environment(monkeypatch):
    from xplan.runtime import compat
    from xplan.runtime.distributed.allocator import configure_allocator

    calls = []
    monkeypatch.setattr(compat, "set_allocator_settings", calls.append)
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert configure_allocator("expandable_segments", "cpu") == "none"
    assert configure_allocator("expandable_segments", "cuda") == "expandable_segments"
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:False")
    assert configure_allocator("expandable_segments", "cuda") == "caching"  # the user's choice stands
    assert calls == ["expandable_segments:True"]


def test_an_offload_plan_that_overfills_host_memory_is_refused_before_start(monkeypatch):
    from xplan.errors import InputError
    from xplan.plan import make_plan
    from xplan.runtime.train import launch

    layout = Layout(devices=8, fsdp=8, offload=("activations",))
    plan = make_plan("qwen3-8b", "h800", layout, {"seq_len": 4096, "global_batch": 8},
                     predictions={"memory_gib": {"offloaded_to_host": 100.0}})
    monkeypatch.setattr(launch, "_available_host_bytes", lambda: 1000 * 2**30)
    launch.check_host_offload(plan, 8)  # 800 GiB of 1000
    monkeypatch.setattr(launch, "_available_host_bytes", lambda: 500 * 2**30)
    with pytest.raises(InputError, match="offloads 100.0 GiB per rank"):
        launch.check_host_offload(plan, 8)


def test_a_tensor_saved_again_after_its_first_node_was_freed_gets_a_fresh_copy():
    """A saved tensor whose node autograd frees during the forward (a branch the loss does not use)
    and that a later op saves again must still come back in backward."""

    class Block(torch.nn.Module):
        def forward(self, x):
            y = x * 2.0
            (y * y).sum()  # saves y, and the node is freed at once (its result is dropped)
            return y * y  # saves y again

    blocks = [Block(), Block()]
    ActivationOffload(blocks, "cpu")
    x = torch.randn(2, 8, requires_grad=True)
    blocks[1](blocks[0](x)).sum().backward()
    assert torch.allclose(x.grad, 256.0 * x.detach() ** 3)  # out = (2 (2x)^2)^2 = 64 x^4


def test_views_of_one_storage_are_copied_once_and_come_back_right():
    """q and k, two views of one projection's output, share one host copy of that storage (what the
    trace counts), and backward gets each view back."""
    from xplan.runtime.distributed.offload import OffloadLabels

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            q, k = (x @ self.w).chunk(2, dim=-1)  # views of one [4, 16] storage
            return q * k  # saves q and k

    torch.manual_seed(0)
    blocks = [Block(), Block()]
    x = torch.randn(4, 8, requires_grad=True)
    reference = torch.autograd.grad(blocks[1](blocks[0](x) @ torch.ones(8, 8)).sum(), [x, blocks[0].w])
    copied = []
    ActivationOffload(blocks, "cpu", OffloadLabels(host=lambda t: copied.append(t.numel() * t.element_size())))
    grads = torch.autograd.grad(blocks[1](blocks[0](x) @ torch.ones(8, 8)).sum(), [x, blocks[0].w])
    assert copied == [4 * 8 * 4, 4 * 16 * 4]  # block 0: its input, its projection output once (block 1 keeps its own)
    assert all(torch.allclose(a, b) for a, b in zip(grads, reference, strict=True))
