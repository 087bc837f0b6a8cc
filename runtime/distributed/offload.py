"""Host offload per layout: optimizer states / parameters, and activations.

- ``optimizer`` or ``params`` in `layout.offload`: FSDP2 `CPUOffloadPolicy(pin_memory=False)` —
  sharded parameters, gradients and therefore the optimizer states live in host memory; the
  optimizer steps on the host and FSDP copies shards to the device for each all-gather.
- ``activations``: the tensors each decoder block saves for backward go to host memory through
  `torch.autograd.graph.save_on_cpu` (entered by forward pre-hooks, left by forward hooks).
  Under full recompute only the block inputs are saved, so those are what moves (XTuner's
  layer-input offload).

On a CPU run everything already lives in host memory: both paths are no-ops with a log line
(`force=True` runs the activation path anyway, for tests).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

from xplan.layout import Layout

log = logging.getLogger("xplan.runtime.distributed")


def fsdp_offload_policy(layout: Layout, device_type: str) -> OffloadPolicy:
    """The FSDP2 offload policy for `layout` (a no-op policy when nothing is offloaded or on cpu)."""
    wanted = [k for k in ("optimizer", "params") if k in layout.offload]
    if not wanted:
        return OffloadPolicy()
    if device_type == "cpu":
        log.info("offload %s: parameters and optimizer states are already in host memory on cpu; nothing to do",
                 ",".join(wanted))
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=False)


class _SaveOnCpuHooks:
    """Forward pre/post hooks that keep a block's saved tensors in host memory during its forward."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.stack: list = []

    def enter(self, module: nn.Module, args) -> None:
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=self.pin_memory)
        ctx.__enter__()
        self.stack.append(ctx)

    def exit(self, module: nn.Module, args, output) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


def apply_activation_offload(blocks: list[nn.Module], layout: Layout, device_type: str,
                             force: bool = False) -> bool:
    """Offload the saved activations of `blocks` to host when the layout asks for it.

    Returns whether hooks were installed.
    """
    if "activations" not in layout.offload:
        return False
    if device_type == "cpu" and not force:
        log.info("offload activations: activations are already in host memory on cpu; nothing to do")
        return False
    hooks = _SaveOnCpuHooks(pin_memory=device_type == "cuda")
    for block in blocks:
        block.register_forward_pre_hook(hooks.enter)
        block.register_forward_hook(hooks.exit, always_call=True)
    return True


__all__ = ["apply_activation_offload", "fsdp_offload_policy"]
