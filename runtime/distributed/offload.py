"""Host offload per layout: optimizer moments, parameters, and activations.

- ``params`` in `layout.offload`: FSDP2 `CPUOffloadPolicy(pin_memory=False)` - sharded
  parameters, gradients and the AdamW moments live in host memory, the optimizer steps on the
  host and FSDP copies shards to the device for each all-gather.
- ``optimizer`` (without ``params``): only the AdamW moments leave the device. Between steps they
  sit in host memory; an optimizer step-pre hook copies them back and a step-post hook copies them
  out again (`OptimizerStateOffload`), so the forward and backward never hold them. Parameters
  and gradients stay on the device.
- ``activations``: what each decoder block saves for backward goes to host memory through
  saved-tensor hooks entered around the block's forward (`ActivationOffload`): copied out on a
  side stream while the next block computes, and copied back one block ahead in backward. Under
  full recompute only the block inputs are saved (the recompute checkpoints); under selective
  recompute the block input moves and the module outputs the policy keeps stay on the device (they
  are held by the policy, not by autograd); without recompute every saved tensor moves. A saved
  tensor's whole storage is copied, once per block: views of one storage share the copy. The last
  block keeps its tensors on the device (its backward comes first). Parameters and the tensors
  all blocks share (rotary tables) never move.

Device memory: the forward holds the block that runs and the one whose copies are in flight; the
backward holds the block that runs and the one being prefetched (`cost_models/offload.py` prices
exactly this). On CUDA the copies use pinned host memory and a side stream, and the compute
stream waits for a copy only where its memory is released or its tensor is used. Elsewhere the
same code runs synchronously (no stream): on CPU it copies host memory to host memory, which
saves nothing but executes the plan as priced (the cost model prices those copies unhidden), and
keeps the path exercised by the tests and the dry run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

from xplan.layout import Layout

log = logging.getLogger("xplan.runtime.distributed")

# Called with each tensor that now lives in host memory (the dry run counts it as host bytes) and
# with each tensor copied back to the device in backward (an activation again, not a temporary).
OnTensor = Callable[[torch.Tensor], None]


def _ignore(tensor: torch.Tensor) -> None:
    return None


@dataclass
class OffloadLabels:
    """Hooks for observers (the dry run's memory tracker): where each copy lives."""

    host: OnTensor = _ignore
    restored: OnTensor = _ignore


def fsdp_offload_policy(layout: Layout, device_type: str) -> OffloadPolicy:
    """FSDP2's offload policy: CPU offload for ``params`` (a no-op policy otherwise and on cpu)."""
    if "params" not in layout.offload:
        return OffloadPolicy()
    if device_type == "cpu":
        log.info("offload params: parameters and optimizer states are already in host memory on cpu; nothing to do")
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=False)


class _Copier:
    """Device <-> host copies: pinned memory and a side stream on CUDA, plain copies elsewhere."""

    def __init__(self, device_type: str, labels: OffloadLabels):
        self.cuda = device_type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.labels = labels

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.size(), dtype=tensor.dtype, device="cpu", pin_memory=self.cuda)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is made on the compute stream
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its memory is not reused before the copy is done
        else:
            host.copy_(tensor)
        self.labels.host(host)
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        # Allocated on the compute stream (which frees it), written by the side stream.
        out = torch.empty(host.size(), dtype=host.dtype, device=device)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out.copy_(host, non_blocking=True)
        else:
            out.copy_(host)
        self.labels.restored(out)
        return out

    def event(self):
        """A marker after the copies issued so far (None without a stream)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    @staticmethod
    def wait(event) -> None:
        """Make the compute stream wait for `event` (device side: the host does not block)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def copy_into(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        """Refresh an existing host copy."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
        else:
            host.copy_(tensor)


@dataclass
class _Entry:
    host: torch.Tensor | None  # None: kept on the device (the last block)
    device: torch.Tensor | None  # on the device: until copied out (forward), once copied back (backward)
    device_of: torch.device
    slots: int = 0  # saved-tensor slots autograd still holds


class _Slot:
    """What autograd keeps for one saved tensor. Its copy back lives as long as autograd keeps
    the slot (as the tensor itself would without offload): the last slot gone frees both copies."""

    __slots__ = ("entry", "group", "view")

    def __init__(self, group: _Group, entry: _Entry, view: tuple):
        self.group, self.entry, self.view = group, entry, view  # view: (size, stride, storage offset)
        entry.slots += 1

    def __del__(self):
        self.entry.slots -= 1
        if self.entry.slots == 0:
            self.entry.host = self.entry.device = None


@dataclass
class _Group:
    """One block's saved tensors in one micro-batch."""

    index: int
    offloaded: bool
    entries: list[_Entry] = field(default_factory=list)
    # (storage, dtype) -> its entry: tensors saved twice, or views of one storage, share one copy
    by_storage: dict[tuple, _Entry] = field(default_factory=dict)
    copied: object = None  # event after this group's copies to host
    prefetch_issued: bool = False
    prefetched: object = None  # event after its copies back


def _whole_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A flat tensor of `tensor`'s dtype over all of its storage (the tensor itself when it is)."""
    numel = tensor.untyped_storage().nbytes() // tensor.element_size()
    if tensor.storage_offset() == 0 and tensor.numel() == numel and tensor.is_contiguous():
        return tensor.detach().view(-1)
    return tensor.detach().as_strided((numel,), (1,), 0)


class ActivationOffload:
    """Saved-tensor hooks around each decoder block's forward (see the module docstring).

    One instance serves a model; a forward of the first block starts a new pass (micro-batch).
    """

    def __init__(self, blocks: list[nn.Module], device_type: str, labels: OffloadLabels | None = None):
        self.blocks = blocks
        self.copier = _Copier(device_type, labels or OffloadLabels())
        self.groups: dict[int, _Group] = {}
        self.current: _Group | None = None
        self.shared: set[int] = set()  # ids of the block inputs every block shares (rotary tables)
        self._contexts: list = []
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(self._enter(index))
            block.register_forward_hook(self._exit(index), always_call=True)

    # ---- forward
    def _enter(self, index: int):
        def hook(module: nn.Module, args) -> None:
            if index == 0:
                self.groups.clear()
            # Inputs after the hidden states are shared by every block: they never move.
            self.shared = {id(a) for a in args[1:] if isinstance(a, torch.Tensor)}
            self.current = self.groups[index] = _Group(index, offloaded=index < len(self.blocks) - 1)
            context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            context.__enter__()
            self._contexts.append(context)
        return hook

    def _exit(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            if self._contexts:
                self._contexts.pop().__exit__(None, None, None)
            group = self.groups.get(index)
            if group is not None and group.offloaded:
                group.copied = self.copier.event()
            # The previous block's copies had this block's forward to finish: release its device memory.
            previous = self.groups.get(index - 1)
            if previous is not None and previous.offloaded:
                self.copier.wait(previous.copied)
                for entry in previous.entries:
                    entry.device = None
            self.current = None
        return hook

    def _moves(self, tensor: torch.Tensor) -> bool:
        if self.copier.cuda and tensor.device.type != "cuda":
            return False  # host-side tensors (split sizes) already are where they would go
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return False  # FSDP's gathered weights: regathered in backward, never copied
        return id(tensor) not in self.shared and id(tensor._base) not in self.shared

    def _pack(self, tensor: torch.Tensor):
        group = self.current
        if group is None or not self._moves(tensor):
            return tensor
        # What autograd would keep alive is the tensor's whole storage (views of one storage - q, k, v
        # of one projection, a tile's slice of the block's tokens - keep it once): that storage is
        # copied, once, and each saved view is rebuilt from it in backward.
        key = (tensor.untyped_storage()._cdata, tensor.dtype)
        entry = group.by_storage.get(key)
        if entry is None or entry.slots == 0:  # new, or saved before by a node autograd already freed
            whole = _whole_storage(tensor)
            host = self.copier.to_host(whole) if group.offloaded else None
            entry = group.by_storage[key] = _Entry(host, whole, tensor.device)
            group.entries.append(entry)
        return _Slot(group, entry, (tensor.size(), tensor.stride(), tensor.storage_offset()))

    # ---- backward
    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        group, entry = packed.group, packed.entry
        if group.index > 0:
            self._prefetch(group.index - 1)  # the block before runs its backward next: bring it back now
        if entry.device is None:  # not prefetched (a block run out of order): fetch it now
            self._prefetch(group.index, force=True)
        self.copier.wait(group.prefetched)
        size, stride, offset = packed.view
        return entry.device.as_strided(size, stride, offset)

    def _prefetch(self, index: int, force: bool = False) -> None:
        group = self.groups.get(index)
        if group is None or not group.offloaded or (group.prefetch_issued and not force):
            return
        for entry in group.entries:
            if entry.device is None and entry.host is not None and entry.slots:
                entry.device = self.copier.to_device(entry.host, entry.device_of)
        group.prefetch_issued, group.prefetched = True, self.copier.event()


def apply_activation_offload(blocks: list[nn.Module], layout: Layout, device_type: str,
                             labels: OffloadLabels | None = None) -> ActivationOffload | None:
    """Offload the saved activations of `blocks` to host when the layout asks for it. Returns the
    offloader, or None."""
    if "activations" not in layout.offload:
        return None
    return ActivationOffload(blocks, device_type, labels)


class OptimizerStateOffload:
    """AdamW moments in host memory between optimizer steps (``offload: optimizer``).

    A step-pre hook gives each moment its device storage back and copies it in; a step-post hook
    copies it out and frees the device storage (the state tensors, DTensors included, stay the
    same objects: their local storage is resized, as FSDP2 does with parameters). `resident()`
    brings them back for a checkpoint.
    """

    STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, optimizer: torch.optim.Optimizer, device_type: str, labels: OffloadLabels | None = None):
        self.optimizer = optimizer
        self.copier = _Copier(device_type, labels or OffloadLabels())
        self.host: dict[tuple[int, str], torch.Tensor] = {}  # (id(parameter), state key) -> host copy
        self.offloaded = False
        optimizer.register_step_pre_hook(lambda *_: self.load())
        optimizer.register_step_post_hook(lambda *_: self.offload())

    def _moments(self):
        """((parameter id, key), local state tensor) for every moment."""
        for param, state in self.optimizer.state.items():
            for key in self.STATE_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    yield (id(param), key), (value.to_local() if hasattr(value, "to_local") else value)

    @torch.no_grad()
    def offload(self) -> None:
        if self.offloaded:
            return
        for key, local in self._moments():
            if key in self.host:
                self.copier.copy_into(self.host[key], local)
            else:
                self.host[key] = self.copier.to_host(local)
        self.copier.wait(self.copier.event())  # the copies finish before the storage is reused
        for _, local in self._moments():
            local.untyped_storage().resize_(0)
        self.offloaded = True

    @torch.no_grad()
    def load(self) -> None:
        if not self.offloaded:
            return
        for key, local in self._moments():
            local.untyped_storage().resize_(local.numel() * local.element_size())
            local.copy_(self.host[key], non_blocking=self.copier.cuda)
        self.offloaded = False

    def resident(self):
        """Context: the moments on the device (checkpoint save and load), in host memory again after."""
        import contextlib

        @contextlib.contextmanager
        def context():
            self.load()
            try:
                yield
            finally:
                if self.host:
                    self.offload()
        return context()


def apply_optimizer_offload(optimizer: torch.optim.Optimizer, layout: Layout, device_type: str,
                            labels: OffloadLabels | None = None) -> OptimizerStateOffload | None:
    """Keep the AdamW moments in host memory between steps when the layout offloads the optimizer
    alone (``params`` moves them with the parameters through FSDP2; ZeRO-1 keeps its fp32 shards
    and their moments in host memory itself)."""
    if "optimizer" not in layout.offload or "params" in layout.offload or layout.zero1:
        return None  # params: FSDP2's CPU offload moves them; zero1 keeps its shards on host itself
        return None
    offload = OptimizerStateOffload(optimizer, device_type, labels)
    optimizer._xplan_state_offload = offload  # type: ignore[attr-defined]  (checkpoints make them resident)
    return offload


__all__ = ["ActivationOffload", "OffloadLabels", "OptimizerStateOffload", "apply_activation_offload",
           "apply_optimizer_offload", "fsdp_offload_policy"]
