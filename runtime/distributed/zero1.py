"""ZeRO-1 (`dp_mode: zero1`): Megatron's distributed optimizer, on replicated parameters.

Per rank, for a model of P parameters over n data-parallel ranks (what `cost_models` prices):

- parameters: replicated in the compute dtype (bf16; fp32 for `precision: fp32`), the tensors
  the model runs with; no FSDP2 wrapping, no per-block gathers;
- gradients: each micro-batch's gradient is added into an fp32 buffer per parameter (replicated,
  made by the first gradient of the step); after the last micro-batch one reduce-scatter per
  parameter leaves this rank the summed gradient of its shard, and the buffer is freed;
- optimizer: AdamW steps on fp32 master shards (P / n each, with their moments), then one
  all-gather per parameter rebuilds the replicated compute-dtype parameters.

Shards follow FSDP2's convention: dim 0 (dim 1 where dim 0 is not a multiple of n and dim 1 is),
in `torch.chunk` pieces, as DTensors of the parameter's global shape. Dense parameters are
sharded over every rank (the `world` mesh); expert-parallel experts, whose local slice differs per
EP rank, over the ranks holding the same slice (`Meshes.expert_replicate`), on a 2-D (ep, edp)
mesh. So DCP checkpoints of the masters and their AdamW states have the same keys and global
shapes as an FSDP2 run's and reshard across world sizes and between zero1, fsdp and hsdp.

With `offload` optimizer or params on an accelerator the masters and their AdamW states live in host
memory and AdamW steps there (each gradient shard is copied to the host after its reduce-scatter,
each updated shard back before its all-gather); the fp32 gradient buffers stay on the device.
Under fake tensors (dry runs) the masters stay plain tensors (same bytes), as the EP slices do.
The gradient sum is a SUM, like every reduction of the runtime (see `parallelize`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import compat
from ..models.moe import MoE
from .mesh import _MESH_CACHE, Meshes

# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn); older torch has only those.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class ShardedParameter:
    """One parameter: the replica the model runs with, and this rank's fp32 master shard of it."""

    name: str
    param: nn.Parameter  # replicated compute-dtype parameter (a DTensor over EP for sliced experts)
    group: dist.ProcessGroup  # the ranks holding copies of `param` (the shard group)
    ranks: int
    index: int  # this rank's position in `group`
    dim: int  # the sharded dimension
    rows: int  # shard length along `dim` (the last shards may be shorter or empty)
    master: nn.Parameter | None = None  # fp32 shard this rank's optimizer updates
    main_grad: torch.Tensor | None = None  # fp32 buffer_shape: the gradient, `dim` moved first, padded

    @property
    def length(self) -> int:
        return _local(self.param).shape[self.dim]

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        """The gradient buffer: `dim` first, padded to `rows` × `ranks` (the reduce-scatter input)."""
        local = _local(self.param)
        if local.dim() == 0:
            return ()
        return (self.rows * self.ranks, *local.movedim(self.dim, 0).shape[1:])

    def own_rows(self) -> tuple[int, int]:
        """(start, length) of this rank's shard along `dim`."""
        start = min(self.index * self.rows, self.length)
        return start, min(start + self.rows, self.length) - start


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """`t` at full size on the host (collective for a DTensor)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _wrap(local: torch.Tensor, mesh: DeviceMesh, placements, shape: torch.Size, stride) -> DTensor:
    """A DTensor of global `shape` around this rank's shard, left where it is (host or device)."""
    return compat.dtensor_keeping_device(local, mesh, placements, shape, stride)


def _shard_dim(shape: torch.Size, ranks: int) -> int:
    """FSDP2's choice: dim 0, or dim 1 when only dim 1 divides evenly (few experts per EP rank)."""
    if len(shape) >= 2 and shape[0] % ranks and shape[1] % ranks == 0:
        return 1
    return 0


def _expert_optimizer_mesh(meshes: Meshes) -> DeviceMesh:
    """A 2-D (ep, edp) view of the ranks for expert masters: experts split over ep first, then each
    slice over the ranks that hold it (DTensor shards mesh dimensions left to right)."""
    ranks = meshes.expert.mesh.reshape(-1, meshes.ep_size)  # (edp, ep): ep consecutive ranks
    key = ("zero1 expert masters", meshes.device_type, tuple(ranks.shape))
    if key not in _MESH_CACHE:  # a new mesh makes new process groups: once per shape
        _MESH_CACHE[key] = DeviceMesh(meshes.device_type, ranks.t().contiguous(), mesh_dim_names=("ep", "edp"))
    return _MESH_CACHE[key]


def _replace_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Swap `old` for `new` wherever a module holds it (tied embeddings stay tied)."""
    for module in model.modules():
        for attr, value in list(module._parameters.items()):
            if value is old:
                module._parameters[attr] = new


def _expert_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}


class ZeroOne:
    """The ZeRO-1 state of one model (`model._xplan_zero1`); see the module docstring."""

    def __init__(self, model: nn.Module, meshes: Meshes, compute_dtype: torch.dtype, offload: bool = False):
        self.meshes = meshes
        self.compute_dtype = compute_dtype
        self.device = meshes.device
        # Masters and optimizer states in host memory (a no-op on cpu, where everything is).
        self.master_device = torch.device("cpu") if offload else meshes.device
        self._model = weakref.ref(model)
        self.gradient_observers: list[Callable[[torch.Tensor], None]] = []  # dry run: label new buffers
        experts = _expert_parameter_ids(model) if meshes.ep_size > 1 else set()
        self.parameters: list[ShardedParameter] = []
        for name, param in list(model.named_parameters()):
            if not param.requires_grad:
                continue
            shard_mesh = meshes.expert_replicate if id(param) in experts else meshes.world
            item = self._shard(name, param, shard_mesh, id(param) in experts)
            if param.dtype != compute_dtype:  # the replica keeps only the compute dtype
                item.param = nn.Parameter(param.detach().to(compute_dtype))
                _replace_parameter(model, param, item.param)
            self.parameters.append(item)
        for item in self.parameters:
            item.param.register_post_accumulate_grad_hook(self._accumulate_hook(item))

    def _shard(self, name: str, param: nn.Parameter, shard_mesh: DeviceMesh, expert: bool) -> ShardedParameter:
        local = _local(param.detach())
        ranks = shard_mesh.size()
        dim = _shard_dim(local.shape, ranks) if local.dim() else 0
        rows = math.ceil(local.shape[dim] / ranks) if local.dim() else 1
        item = ShardedParameter(name, param, shard_mesh.get_group(), ranks, shard_mesh.get_local_rank(), dim, rows)
        with torch.no_grad():
            if local.dim() == 0:
                piece = local.float().clone()
            else:
                start, length = item.own_rows()
                piece = local.narrow(dim, start, length).float().clone()
            piece = piece.to(self.master_device)
            master = piece if compat.is_fake(piece) else self._as_dtensor(piece, param, dim, shard_mesh, expert)
        item.master = nn.Parameter(master)
        return item

    def _as_dtensor(self, piece: torch.Tensor, param: nn.Parameter, dim: int, shard_mesh: DeviceMesh,
                    expert: bool) -> DTensor:
        shape = param.shape  # global (all experts for an EP slice)
        stride = torch.empty(shape, device="meta").stride()
        if expert:
            mesh, placements = _expert_optimizer_mesh(self.meshes), [Shard(0), Shard(dim)]
        else:
            mesh, placements = shard_mesh, [Shard(dim)] if piece.dim() else [Replicate()]
        return _wrap(piece, mesh, placements, shape, stride)

    # ------------------------------------------------------------------ gradients
    def _accumulate_hook(self, item: ShardedParameter):
        def accumulate(param: torch.Tensor) -> None:
            grad = _local(param.grad)
            if item.main_grad is None:
                item.main_grad = torch.zeros(item.buffer_shape, dtype=torch.float32, device=grad.device)
                for observe in self.gradient_observers:
                    observe(item.main_grad)
            if grad.dim():
                item.main_grad[:item.length].add_(grad.movedim(item.dim, 0))
            else:
                item.main_grad.add_(grad)
            param.grad = None  # the compute-dtype gradient lives only until it is added

        return accumulate

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter (SUM) each accumulated gradient onto this rank's master shard's `.grad`."""
        for item in self.parameters:
            full = item.main_grad
            if full is None:  # no gradient reached it this step (e.g. an expert no token chose)
                full = torch.zeros(item.buffer_shape, dtype=torch.float32, device=_local(item.param).device)
            item.main_grad = None
            if full.dim() == 0:  # scalars: every rank holds (and updates) the whole value
                if item.ranks > 1:
                    dist.all_reduce(full, group=item.group)
                shard = full
            else:
                shard = full.new_empty((item.rows, *full.shape[1:]))
                if item.ranks > 1:
                    _reduce_scatter(shard, full, group=item.group)
                else:
                    shard.copy_(full)
                del full
                _, length = item.own_rows()
                shard = shard[:length].movedim(0, item.dim)
            master = item.master
            shard = shard.to(self.master_device)
            if isinstance(master, DTensor):
                shard = _wrap(shard, master.device_mesh, master.placements, master.shape, master.stride())
            master.grad = shard

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def gather_parameters(self) -> None:
        """All-gather the updated masters, in the compute dtype, into the replicated parameters."""
        for item in self.parameters:
            piece = _local(item.master).to(self.device)
            target = _local(item.param)
            if piece.dim() == 0:
                target.copy_(piece)
                continue
            send = piece.to(self.compute_dtype).movedim(item.dim, 0)
            if send.shape[0] < item.rows:  # the last shards are short: pad to the common length
                pad = send.new_zeros((item.rows - send.shape[0], *send.shape[1:]))
                send = torch.cat([send, pad])
            send = send.contiguous()
            if item.ranks > 1:
                full = send.new_empty((item.rows * item.ranks, *send.shape[1:]))
                _all_gather(full, send, group=item.group)
            else:
                full = send
            target.copy_(full[:item.length].movedim(0, item.dim))

    def named_masters(self) -> list[tuple[str, nn.Parameter]]:
        return [(item.name, item.master) for item in self.parameters]

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """After every optimizer step, rebuild the replicated parameters from the masters."""
        optimizer.register_step_post_hook(lambda *_: self.gather_parameters())

    # ------------------------------------------------------------------ checkpoints
    def _ensure_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Create the AdamW states (a step at learning rate 0 on zero gradients) so DCP can load
        into them; the values are overwritten by the load."""
        if optimizer.state:
            return
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state dicts keyed like `get_state_dict` on an FSDP2 model: fp32 masters
        by parameter name (with the persistent buffers), AdamW states by parameter name. The tensors
        are the live ones, so `dcp.load` into them restores in place (then call `load_state_dicts`)."""
        self._ensure_optimizer_state(optimizer)
        names = {id(item.master): item.name for item in self.parameters}
        params = {id(p) for p in self._model().parameters()}
        model_sd = {name: value for name, value in self._model().state_dict(keep_vars=True).items()
                    if id(value) not in params}  # persistent buffers
        model_sd.update({item.name: item.master for item in self.parameters})
        state = {names[id(p)]: dict(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]
                 if p in optimizer.state}
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
                  for group in optimizer.param_groups]
        return model_sd, {"state": state, "param_groups": groups}

    def load_state_dicts(self, optimizer: torch.optim.Optimizer, model_sd: dict[str, Any],
                         optim_sd: dict[str, Any]) -> None:
        """After `dcp.load` filled the dicts of `state_dicts`: copy what DCP replaced rather than
        filled (scalars, hyperparameters) and rebuild the replicated parameters."""
        tensors = {**self._model().state_dict(keep_vars=True), **dict(self.named_masters())}
        names = {id(item.master): item.name for item in self.parameters}
        with torch.no_grad():
            for name, value in model_sd.items():
                if value is not tensors[name]:
                    _local(tensors[name]).copy_(_local(value))
            for group in optimizer.param_groups:
                for p in group["params"]:
                    for key, value in optim_sd["state"].get(names[id(p)], {}).items():
                        state = optimizer.state[p].get(key)
                        if isinstance(state, torch.Tensor) and state is not value:
                            _local(state).copy_(_local(value))
        for group, saved in zip(optimizer.param_groups, optim_sd["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.gather_parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained parameter at full size in fp32, by its first name (collective)."""
        return {item.name: _full(item.master) for item in self.parameters}

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict at full size (collective; for the Hugging Face export): the
        fp32 masters under every name a parameter has (tied embeddings: both), the rest (persistent
        buffers, frozen parameters, which ZeRO-1 leaves replicated) as the model holds them."""
        items = {id(item.param): item for item in self.parameters}
        gathered: dict[int, torch.Tensor] = {}
        out = {}
        for name, value in self._model().state_dict(keep_vars=True).items():  # the same order on every rank
            item = items.get(id(value))
            if item is None:
                out[name] = _full(value)
                continue
            if id(item) not in gathered:
                gathered[id(item)] = _full(item.master)
            out[name] = gathered[id(item)]
        return out


def apply_zero1(model: nn.Module, meshes: Meshes, compute_dtype: torch.dtype, offload: bool = False) -> ZeroOne:
    """Put `model` under ZeRO-1 (in place): replicas in `compute_dtype`, fp32 master shards (in
    host memory with `offload`)."""
    zero = ZeroOne(model, meshes, compute_dtype, offload)
    model._xplan_zero1 = zero  # type: ignore[attr-defined]
    return zero


def zero1_of(model: nn.Module) -> ZeroOne | None:
    return getattr(model, "_xplan_zero1", None)


__all__ = ["ShardedParameter", "ZeroOne", "apply_zero1", "zero1_of"]
