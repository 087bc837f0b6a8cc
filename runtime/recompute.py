"""Activation recompute policies: what a decoder block keeps for backward and what it redoes.

One function, `apply_recompute(block, policy)`, is the only way the runtime (training) and the
planner's tracer (measuring saved bytes) turn a policy on, so the two cannot drift.

Policies (`RECOMPUTE_POLICIES`):
- ``"none"``: plain autograd; every tensor an op saves for backward stays alive.
- ``"selective"``: op-level selective activation checkpointing (SAC): the outputs of matmuls
  (mm/addmm/bmm/baddbmm), grouped expert GEMMs, attention kernels (SDPA and flash/efficient/cudnn
  attention) and communication collectives, plus device-to-host copies, are saved (`MUST_SAVE`);
  everything else (norms, activations, rotary, routing, casts) is recomputed in backward from them.
- ``"full"``: the whole block is checkpointed; only its inputs are kept and the block's forward is
  rerun in backward.

Both checkpointing policies use `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`,
which composes with FSDP2, fake tensors and saved-tensor hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .compat import COLLECTIVE_NAMESPACES, op_packets

RECOMPUTE_POLICIES = ("none", "selective", "full")

_aten = torch.ops.aten


def _save_list() -> frozenset:
    ops = op_packets("aten", (
        # matmuls
        "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
        # fused attention kernels
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
        "_efficient_attention_forward",
    ))
    collectives = (
        "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
        "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced", "wait_tensor",
    )
    for namespace in COLLECTIVE_NAMESPACES:
        ops |= op_packets(namespace, collectives)
    return frozenset(ops)


SELECTIVE_SAVE_OPS = _save_list()


def selective_saves(func, args: tuple = (), kwargs: dict | None = None) -> bool:
    """Whether the selective policy keeps the output of this aten op (else it is recomputed)."""
    packet = getattr(func, "overloadpacket", func)
    if packet in SELECTIVE_SAVE_OPS:
        return True
    if packet is _aten._to_copy and args and isinstance(args[0], torch.Tensor):
        # Device-to-host copies (e.g. expert-parallel split sizes) are not redone.
        device = (kwargs or {}).get("device")
        return device is not None and torch.device(device) != args[0].device
    return False


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if selective_saves(func, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """The `context_fn` for `checkpoint` that implements the selective policy."""
    return create_selective_checkpoint_contexts(_selective_policy)


def check_policy(policy: str) -> str:
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute policy must be one of {', '.join(RECOMPUTE_POLICIES)}; got {policy!r}")
    return policy


def recompute_policy(block: nn.Module) -> str:
    """The policy `apply_recompute` last put on this block ('none' if never)."""
    wrapper = block.__dict__.get("forward")
    return getattr(wrapper, "_xplan_recompute", "none")


def checkpointed(fn: Callable, policy: str) -> Callable:
    """`fn` run under the given policy (for callables that are not modules)."""
    check_policy(policy)
    if policy == "none":
        return fn
    kwargs = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = selective_context_fn

    def run(*args, **kw):
        return checkpoint(fn, *args, **kwargs, **kw)

    return run


def apply_recompute(block: nn.Module, policy: str) -> nn.Module:
    """Put `policy` on `block` in place (idempotent; 'none' removes an earlier policy).

    The block's forward is replaced by an instance attribute that runs the class forward under
    `torch.utils.checkpoint`; parameter names, hooks (FSDP2's included) and the module's class
    are untouched. Returns the block.
    """
    check_policy(policy)
    current = block.__dict__.get("forward")
    if current is not None:
        if getattr(current, "_xplan_recompute", None) is None:
            raise ValueError("block already has an instance-level forward that apply_recompute did not set")
        del block.__dict__["forward"]
    if policy == "none":
        return block
    wrapper = checkpointed(block.forward, policy)
    wrapper._xplan_recompute = policy  # type: ignore[attr-defined]
    block.__dict__["forward"] = wrapper
    return block


__all__ = [
    "RECOMPUTE_POLICIES",
    "SELECTIVE_SAVE_OPS",
    "apply_recompute",
    "check_policy",
    "checkpointed",
    "recompute_policy",
    "selective_context_fn",
    "selective_saves",
]
