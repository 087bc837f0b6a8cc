"""Every private PyTorch API the runtime touches, in one module.

PyTorch keeps these names private (a leading underscore, `torch.testing._internal`,
`torch.distributed._tools`), so any minor release may move or change them. Each touch point
below says why the runtime needs it and where it is known to work. `tests/test_torch_compat.py`
exercises every one on the installed torch (its test ids name the version), so an upgrade that
breaks one fails there, by name, instead of deep inside a run or a dry run.

Versions: pyproject allows torch >= 2.10, < 2.15. Every touch point is tested on 2.13 (the pinned
CPU build). The floor is `DeviceMesh._unflatten`, which the runtime's meshes need and which torch
2.8/2.9 lack (it shipped in 2.10); other versions in the range are untested.

Public torch APIs (FSDP2's `fully_shard`, DTensor, `torch.utils.checkpoint`, DCP) are used
directly where they are needed; so are `nn.Module._parameters` (read) and `Module.__dict__`
(instance-level forwards), which are part of nn.Module's long-stable behaviour.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

# --------------------------------------------------------------------------------------------------
# Functional collectives (expert-parallel and Ulysses all-to-alls, Ulysses image all-gather)
#
# `torch.distributed._functional_collectives` is the traceable, autograd-aware collective API that
# torchtitan uses too; `all_to_all_single_autograd` is the only differentiable all-to-all with
# uneven splits; `all_gather_single_autograd` gathers on dim 0 and reduce-scatters (sum) the
# gradient in backward (`all_gather_tensor_autograd` is its deprecated name). Tested: 2.13.

all_to_all_single = funcol.all_to_all_single
all_to_all_single_autograd = funcol.all_to_all_single_autograd
all_gather_single_autograd = funcol.all_gather_single_autograd


def wait_collective(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a functional collective's result (waits for it when it is async)."""
    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


def op_packets(namespace: str, names: Sequence[str]) -> set:
    """The op packets `torch.ops.<namespace>.<name>` that exist in this torch (missing ones are left
    out, so a renamed op shrinks a set instead of failing at import). Collective ops live in the
    private namespaces `_c10d_functional`, `_c10d_functional_autograd` and `c10d`. Tested: 2.13."""
    ops = getattr(torch.ops, namespace, None)
    return {packet for name in names if (packet := getattr(ops, name, None)) is not None}


COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d")


def all_to_all_overloads() -> frozenset:
    """Every overload of the all-to-all ops EP and Ulysses run (the dry run labels their outputs)."""
    packets = op_packets("_c10d_functional", ("all_to_all_single",)) | \
        op_packets("_c10d_functional_autograd", ("all_to_all_single",)) | op_packets("c10d", ("alltoall_base_",))
    return frozenset(getattr(p, name) for p in packets for name in p.overloads())


# --------------------------------------------------------------------------------------------------
# Device meshes


def unflatten_mesh(mesh, dim: int, sizes: tuple[int, ...], names: tuple[str, ...]):
    """`DeviceMesh._unflatten`: split one dimension of `mesh` into named dimensions.

    All of a layout's meshes are views of one 1-D world mesh, so FSDP2 can combine the expert
    mesh with the expert-parallel mesh into one SPMD mesh (`runtime.distributed.mesh`); public
    `init_device_mesh` calls would create unrelated meshes. Tested: 2.13; missing before 2.10."""
    if not hasattr(mesh, "_unflatten"):
        raise RuntimeError(f"this torch ({torch.__version__}) has no DeviceMesh._unflatten, which the runtime's "
                           "meshes need; install a torch that has it (tested: 2.13).")
    return mesh._unflatten(dim, sizes, names)


def dtensor_keeping_device(local: torch.Tensor, mesh, placements, shape: torch.Size, stride: tuple[int, ...]):
    """A DTensor around `local` without moving it to the mesh's device: ZeRO-1's master shards in
    host memory under a cuda/npu mesh (optimizer offload), the way FSDP2's CPU offload keeps its
    shards (`_from_local_no_grad`). `DTensor.from_local` would copy them to the device. Uses
    `DTensorSpec` / `TensorMeta` and the DTensor constructor. Tested: 2.13."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(mesh, tuple(placements), tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), local.dtype))
    return DTensor(local, spec, requires_grad=local.requires_grad)


# --------------------------------------------------------------------------------------------------
# Fake tensors and the fake process group (dry runs)


def fake_tensor_mode(**kwargs):
    """`torch._subclasses.fake_tensor.FakeTensorMode`: tensors with shapes and no storage, the
    dry run's whole model at full size on one CPU. Tested: 2.13."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(**kwargs)


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a fake tensor (EP cannot read split sizes from one). Tested: 2.13."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(tensor)


def active_fake_mode():
    """The fake mode in effect now (`torch._guards.active_fake_mode`), or None. Tested: 2.13."""
    from torch._guards import active_fake_mode as _active

    return _active()


def fake_store():
    """`torch.testing._internal.distributed.fake_pg.FakeStore`: the store of the ``"fake"`` backend,
    a process group whose collectives return at once (the dry run is one rank of a full-size
    world). The only way to get that backend; it lives with torch's tests. Tested: 2.13."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


# --------------------------------------------------------------------------------------------------
# Dispatch-mode stack (selective recompute around nested FSDP2 units)


def is_selective_checkpoint_mode(mode) -> bool:
    """Whether `mode` is one of the dispatch modes selective activation checkpointing pushes
    (`torch.utils.checkpoint._CachingTorchDispatchMode` / `_CachedTorchDispatchMode`). Tested: 2.13."""
    from torch.utils import checkpoint

    kinds = tuple(getattr(checkpoint, n) for n in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")
                  if hasattr(checkpoint, n))
    return isinstance(mode, kinds)


def pop_dispatch_modes_while(predicate: Callable[[object], bool]) -> list:
    """Pop modes off the top of the dispatch-mode stack while `predicate(mode)` holds; returns
    them, top first (`torch.utils._python_dispatch`: there is no public way to step outside an
    enclosing mode for a few ops). Tested: 2.13."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode

    modes = []
    while predicate(_get_current_dispatch_mode()):
        modes.append(_pop_mode())
    return modes


def push_dispatch_modes(modes: list) -> None:
    """Put back modes `pop_dispatch_modes_while` returned."""
    from torch.utils._python_dispatch import _push_mode

    for mode in reversed(modes):
        _push_mode(mode)


# --------------------------------------------------------------------------------------------------
# Module hook order


def move_forward_hooks(module: nn.Module, first_pre_hooks: Callable, last_hooks: Callable) -> None:
    """Move the forward pre-hooks for which `first_pre_hooks(hook)` holds to the front and the
    forward hooks for which `last_hooks(hook)` holds to the back (nn.Module keeps them in the
    private ordered dicts `_forward_pre_hooks` / `_forward_hooks`; `register_*(prepend=True)`
    cannot move a hook that is already registered). Tested: 2.13."""
    for key in [k for k, h in module._forward_pre_hooks.items() if first_pre_hooks(h)]:
        module._forward_pre_hooks.move_to_end(key, last=False)
    for key in [k for k, h in module._forward_hooks.items() if last_hooks(h)]:
        module._forward_hooks.move_to_end(key)


# --------------------------------------------------------------------------------------------------
# FSDP2 internals


def fsdp_unsharded_grads(model: nn.Module) -> Iterator[torch.Tensor]:
    """Gradients FSDP2 keeps unsharded (`FSDPParam.unsharded_accumulated_grad` and the unsharded
    parameter's `.grad`: gradient sync deferred, fsdp == 1), read through FSDP2's private state.
    The dry run labels them as gradient state. Tested: 2.13."""
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        group = state._fsdp_param_group if state is not None else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            for grad in (getattr(fsdp_param, "unsharded_accumulated_grad", None), fsdp_param._unsharded_param.grad):
                if grad is not None:
                    yield grad


def fsdp_chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int):
    """FSDP2's own `_chunk_with_empty` (`torch.chunk` padded with empty tensors to `num_chunks`).
    Tested: 2.13 (module `torch.distributed.fsdp._fully_shard._fsdp_common`)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    return _chunk_with_empty(tensor, num_chunks, dim)


class LazyChunks(Sequence):
    """`torch.chunk(tensor, num_chunks, dim)` padded with empty tensors to `num_chunks` entries (FSDP2's
    `_chunk_with_empty`), making only the views that are read. FSDP2 reads one or two of the
    world-size chunks of every parameter; creating all of them costs ~25 µs each under fake tensors
    (half of a DeepSeek-V3 dry run at 256 ranks). Views are the same `narrow`s `torch.chunk` makes."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        n = tensor.size(dim)
        self.size = -(-n // num_chunks)
        self.real = -(-n // self.size)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_chunks))]
        if index < 0:
            index += self.num_chunks
        if not 0 <= index < self.num_chunks:
            raise IndexError(index)
        if index >= self.real:
            return self[0].new_empty(0)
        start = index * self.size
        return self.tensor.narrow(self.dim, start, min(self.size, self.tensor.size(self.dim) - start))


def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int):
    """Drop-in for FSDP2's `_chunk_with_empty` (lazy views; eager for empty dims)."""
    if tensor.dim() == 0 or tensor.size(dim) == 0:
        return fsdp_chunk_with_empty(tensor, num_chunks, dim)
    return LazyChunks(tensor, num_chunks, dim)


@contextlib.contextmanager
def lazy_fsdp_chunks():
    """Within the block, FSDP2 shards parameters with `chunk_with_empty` (patches the name
    `_chunk_with_empty` in `torch.distributed.fsdp._fully_shard._fsdp_param`). Dry runs only: it
    halves their time at hundreds of ranks. Tested: 2.13."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = _fsdp_param._chunk_with_empty
    _fsdp_param._chunk_with_empty = chunk_with_empty
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


# --------------------------------------------------------------------------------------------------
# DTensor shape propagation (dry-run memory tracking)

_PROPAGATION = threading.local()


def in_sharding_propagation() -> bool:
    """True while DTensor runs an op on global-shape fake tensors to propagate shapes (inside
    `skip_sharding_propagation`): those tensors are not memory."""
    return bool(getattr(_PROPAGATION, "depth", 0))


@contextlib.contextmanager
def skip_sharding_propagation():
    """Mark DTensor's shape propagation (`ShardingPropagator._propagate_tensor_meta_non_cached`, run
    under the active fake mode) so `in_sharding_propagation()` tells the dry run's tracker not to
    count its tensors. Tested: 2.13."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, op_schema):
        _PROPAGATION.depth = getattr(_PROPAGATION, "depth", 0) + 1
        try:
            return original(self, op_schema)
        finally:
            _PROPAGATION.depth -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


# --------------------------------------------------------------------------------------------------
# FSDPMemTracker (dry-run memory tracking)


@functools.cache
def mem_tracker_base() -> type:
    """`torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` behind named methods.

    FSDPMemTracker follows every tensor storage through a dispatch mode and FSDP2's hooks; the dry
    run needs its own categories and per-moment peaks, which means overriding its dispatch and
    reading its private state. Subclasses (`runtime.dryrun.tracker`) override `category_of`,
    `on_hooks_registered` and `on_memory_change` and use the read-only helpers; everything private
    stays here. `Ref` is FSDPMemTracker's category enum. A model without an FSDP2 root (ZeRO-1) gets
    FSDPMemTracker's attributes set here, past its FSDP-only check. Tested: 2.13."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only
    from torch.utils.weak import WeakIdKeyDictionary

    c10d = torch.ops.c10d
    wait_tensor = torch.ops._c10d_functional.wait_tensor.default

    class MemTrackerBase(FSDPMemTracker):
        Ref = _FSDPRefType
        extra_categories: tuple[str, ...] = ()

        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
            if isinstance(model, FSDPModule):
                super().__init__(model, optimizer)
            else:  # ZeRO-1 has no FSDP2 root: FSDPMemTracker's state without its FSDP-only check
                MemTracker.__init__(self)
                self._root_mod, self._optm = model, optimizer
                self._fsdp_mod_to_saved_methods = WeakIdKeyDictionary()
                self._fsdp_state = _FSDPState.PRE_FW
            self._ref_class = [*_FSDPRefType, *self.extra_categories]  # the snapshot's keys

        # ---- what subclasses decide
        def category_of(self, func):
            """Category of the tensors `func` just made (also called inside the optimizer step)."""
            raise NotImplementedError

        def on_hooks_registered(self) -> None:
            """Called after FSDPMemTracker (re)registers FSDP2's hooks."""

        def on_memory_change(self) -> None:
            """Called after every tracked op (peak bookkeeping)."""

        # ---- read-only views of the tracker's state
        @property
        def root_module(self) -> nn.Module:
            return self._root_mod

        @property
        def in_backward(self) -> bool:
            return self._mod_tracker.is_bw

        @property
        def in_recompute(self) -> bool:
            return self._in_ac

        @property
        def in_optimizer_step(self) -> bool:
            return self._in_opt

        @property
        def running_modules(self) -> set[str]:
            """Names of the modules whose forward or backward is running ('Global' included)."""
            return self._mod_tracker.parents

        def module_name(self, module: nn.Module) -> str | None:
            return self._mod_tracker.get_known_fqn(module)

        def snapshots(self) -> list[dict]:
            """Per device: category -> bytes now, and 'Total'."""
            return list(self._curr_mem_snap.values())

        def label(self, tensor: torch.Tensor, category) -> None:
            """Count `tensor` (already made) under `category` from now on."""
            self._update_and_maybe_create_winfos(tensor, category)

        # ---- FSDPMemTracker plumbing
        def _register_module_and_optimizer_hooks(self) -> None:
            super()._register_module_and_optimizer_hooks()
            self.on_hooks_registered()

        def _update_peak_stats(self, peak_state) -> None:
            self.on_memory_change()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t == DTensor for t in types):
                return NotImplemented  # let DTensor desugar into local ops first
            if func is wait_tensor and active_fake_mode():
                res = args[0]  # eager wait returns its input; the meta kernel would allocate
            else:
                res = fake_grouped_mm(func, args, kwargs or {})
                if res is None:
                    res = func(*args, **(kwargs or {}))
            if in_sharding_propagation() or active_fake_mode() is not self._fake_mode_on_entry:
                return res
            category = self.category_of(func)
            # Only FSDP2 all-gathers and reduce-scatters in this runtime (EP and Ulysses use
            # all-to-all): label them whatever FSDP's state (explicit backward prefetch runs after
            # the tracked pre-backward, where FSDPMemTracker would call its buffer a temporary).
            if func is c10d._allgather_base_.default:
                self.label(args[0], _FSDPRefType.ALL_GATHER)
            if func is c10d._reduce_scatter_base_.default:
                self.label(args[1], _FSDPRefType.REDUCE_SCATTER)
            tree_map_only(torch.Tensor, lambda t: self._track(category, t), res)
            self.on_memory_change()
            return res

    return MemTrackerBase


# --------------------------------------------------------------------------------------------------
# Allocator settings


def set_allocator_settings(settings: str) -> None:
    """`torch._C._accelerator_setAllocatorSettings` (what `torch.cuda.memory._set_allocator_settings`,
    deprecated, calls): the caching allocator's options (``expandable_segments:True``) at run time,
    the same as ``PYTORCH_ALLOC_CONF`` before start-up. Tested: 2.13 (the CPU build stores them)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


def allocator_settings() -> str:
    """The caching allocator's options in effect (`torch._C._accelerator_getAllocatorSettings`)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return getter() if getter is not None else ""


# --------------------------------------------------------------------------------------------------
# Grouped GEMM


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(x, weight, offs=offsets)`: one GEMM per expert over contiguous row groups,
    one kernel (the MoE grouped GEMM, `runtime.models.grouped`). Two forms: x [tokens, in] with
    weight [experts, in, out] gives [tokens, out]; x [out, tokens] with weight [tokens, in], split
    along the tokens, gives [experts, out, in] (the weight gradient). Tested: 2.13 (CPU)."""
    return torch._grouped_mm(x, weight, offs=offsets)


def fake_grouped_mm(func, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of `aten._grouped_mm` on fake tensors in dtypes its meta kernel refuses, for a
    dispatch mode to return in place of calling it (None: run the op normally).

    The meta kernel accepts bf16 only (the CUDA kernel's rule) while the CPU kernel the runtime
    runs also takes fp32, so the tracer and the dry run of an fp32 MoE plan build the output from
    the shape rule; likewise for expert widths whose rows are not 16-byte aligned, which the
    runtime runs as a loop of matmuls (`grouped_linear`) and fake tensors cannot split by counts.
    Done at dispatch, the op still reaches selective-checkpoint policies and the trackers as
    `_grouped_mm`. Tested: 2.13."""
    if func.overloadpacket is not getattr(torch.ops.aten, "_grouped_mm", None):
        return None
    a, b = args[0], args[1]

    def aligned(t: torch.Tensor) -> bool:  # every stride but the innermost a multiple of 16 bytes
        strides = sorted(t.stride())[1:]
        return all((stride * t.element_size()) % 16 == 0 for stride in strides)

    if not is_fake(a) or (a.dtype == torch.bfloat16 and aligned(a) and aligned(b)):
        return None
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    out_dtype = kwargs.get("out_dtype", args[4] if len(args) > 4 else None) or a.dtype
    if a.dim() == 2 and b.dim() == 2:
        shape = (offs.shape[0], a.shape[0], b.shape[1])
    elif a.dim() == 2:
        shape = (a.shape[0], b.shape[-1])
    elif b.dim() == 2:
        shape = (a.shape[1], b.shape[1])
    else:
        shape = (a.shape[0], a.shape[1], b.shape[-1])
    return torch.empty(shape, dtype=out_dtype, device=a.device)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


__all__ = [
    "COLLECTIVE_NAMESPACES", "LazyChunks", "active_fake_mode", "all_to_all_overloads", "allocator_settings",
    "all_gather_single_autograd", "all_to_all_single", "all_to_all_single_autograd", "chunk_with_empty", "fake_grouped_mm", "fake_store",
    "fake_tensor_mode", "fsdp_chunk_with_empty",
    "fsdp_unsharded_grads", "grouped_mm", "has_grouped_mm", "in_sharding_propagation", "is_fake",
    "is_selective_checkpoint_mode", "lazy_fsdp_chunks", "mem_tracker_base", "move_forward_hooks", "op_packets",
    "pop_dispatch_modes_while", "push_dispatch_modes", "set_allocator_settings", "skip_sharding_propagation",
    "unflatten_mesh",
    "wait_collective",
]
