"""Expert parallelism: each EP rank keeps E / ep routed experts; tokens travel by all-to-all.

Applied per MoE block, in place, without touching the model code:

- the stacked expert parameters ([E, ...]: weights and, for GPT-OSS, biases) are sliced to this
  rank's experts and become DTensors ``Shard(0)`` over the EP mesh (global shape [E, ...], so
  FSDP2, DCP checkpoints and gradient norms see one tensor of all experts);
- `moe.dispatch` / `moe.combine` are replaced on the instance. Routing is untouched and runs
  over all experts before dispatch (DeepSeek-V3's group-limited top-k included); shared experts
  stay dense and replicated (FSDP-sharded like every dense weight).

Dispatch (dropless): sort token copies by global expert id (destination ranks are contiguous),
exchange the per-expert counts with one `all_to_all_single`, move the send/receive split sizes
to the host (the one device-to-host sync of the layer), `all_to_all_single` the tokens, regroup
received rows by local expert, run the experts module's grouped GEMM on its local weights.
Combine reverses the regrouping and the all-to-all and lets the model's own combine un-permute
and sum each token's k outputs in token order. Every step is differentiable
(`all_to_all_single_autograd`).

Under fake tensors (dry runs, `FakeTensorMode(allow_non_fake_inputs=True)`: meshes hold real rank
tables) counts cannot reach the host: the split sizes are the even split of this rank's routed
tokens, with the receive side scaled by `fake_imbalance` (the expected load of the busiest
rank), and the expert slices stay plain tensors (same bytes per rank) because DeviceMesh cannot
combine the EP and expert-FSDP meshes under FakeTensorMode.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from xplan.errors import InputError

from .. import compat
from ..models.moe import MoE

# The expert unit's output feeds only out-of-place ops (the reverse all-to-all), so FSDP2's
# warning about modules that return views (the grouped GEMM returns one) does not apply here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Experts\) returned a view tensor")


@dataclass
class _Route:
    """What combine needs from dispatch (passed through `MoE.forward` in place of `order`)."""

    order: torch.Tensor
    regroup: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]


def local_experts_forward(experts: nn.Module):
    """A forward for `experts` that runs the class forward on the local parts of DTensor params.

    The DTensor parameters (unsharded by FSDP2 when it manages the module) are shadowed by their
    `to_local()` views in the instance ``__dict__`` for the duration of the call; `to_local` is
    differentiable, so gradients reach the DTensor parameters.
    """
    class_forward = type(experts).forward

    def forward(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        shadowed = []
        for name, param in experts._parameters.items():
            if isinstance(param, DTensor):
                experts.__dict__[name] = param.to_local()
                shadowed.append(name)
        try:
            return class_forward(experts, x_sorted, tokens_per_expert)
        finally:
            for name in shadowed:
                experts.__dict__.pop(name, None)

    return forward


def shard_experts(experts: nn.Module, num_experts: int, ep_mesh: DeviceMesh) -> None:
    """Keep this rank's E / ep experts of every stacked parameter, as DTensor Shard(0) over `ep_mesh`."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    local = num_experts // ep
    for name, param in list(experts.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            raise ValueError(f"expert parameter {name} is already distributed; apply expert parallelism once")
        if param.dim() == 0 or param.shape[0] != num_experts:
            raise InputError(f"expert parameter {name} {tuple(param.shape)} is not stacked over the "
                             f"{num_experts} experts; expert parallelism cannot split it.")
        piece = param.detach()[rank * local:(rank + 1) * local].clone()
        if not compat.is_fake(piece):
            piece = DTensor.from_local(piece, ep_mesh, [Shard(0)], run_check=False,
                                       shape=param.shape, stride=param.stride())
        # Under fake tensors (dry runs) the slice stays a plain tensor: FSDP2 would have to combine
        # the EP and expert-FSDP meshes, which DeviceMesh cannot do under FakeTensorMode. Memory
        # per rank is the same.
        setattr(experts, name, nn.Parameter(piece, requires_grad=param.requires_grad))
    experts.__dict__["forward"] = local_experts_forward(experts)


def apply_expert_parallel(moe: MoE, ep_mesh: DeviceMesh, fake_imbalance: float = 1.0) -> MoE:
    """Turn one MoE block into its expert-parallel form over the 1-D `ep_mesh` (in place)."""
    num_experts = moe.num_experts
    ep = ep_mesh.size()
    if num_experts % ep:
        raise InputError(f"ep ({ep}) must divide the number of routed experts ({num_experts}).")
    if "dispatch" in moe.__dict__:
        raise ValueError("expert parallelism is already applied to this MoE block")
    local = num_experts // ep
    group = ep_mesh.get_group()
    base_dispatch, base_combine = type(moe).dispatch, type(moe).combine
    shard_experts(moe.experts, num_experts, ep_mesh)

    def splits(counts: torch.Tensor, received: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
        if compat.is_fake(counts):
            even = [rows // ep + (1 if i < rows % ep else 0) for i in range(ep)]
            busiest = math.ceil(rows * fake_imbalance / ep)
            return even, [busiest] * ep
        both = torch.cat([counts.view(ep, local).sum(1), received.view(ep, local).sum(1)])
        values = both.tolist()  # the one device-to-host sync of this MoE layer
        moe._xplan_received.append(sum(values[ep:]))  # this rank's routed load (step_imbalance)
        return values[:ep], values[ep:]

    def dispatch(x: torch.Tensor, expert_ids: torch.Tensor):
        x_sorted, counts, order = base_dispatch(moe, x, expert_ids)
        # received[i * local + l]: rows rank i sends to this rank's local expert l.
        received = compat.wait_collective(compat.all_to_all_single(counts, None, None, group))
        send_splits, recv_splits = splits(counts, received, x_sorted.shape[0])
        x_recv = compat.wait_collective(compat.all_to_all_single_autograd(x_sorted, recv_splits, send_splits, group))
        del x_sorted  # sent: only the received copy is needed from here
        rows = sum(recv_splits)
        # Rows arrive grouped by (source rank, local expert); regroup them by local expert,
        # keeping source-rank order inside each expert.
        chunk_expert = torch.arange(ep * local, device=x.device) % local
        row_expert = torch.repeat_interleave(chunk_expert, received, output_size=rows)
        regroup = torch.argsort(row_expert, stable=True)
        tokens_per_local_expert = received.view(ep, local).sum(0)
        return x_recv[regroup], tokens_per_local_expert, _Route(order, regroup, send_splits, recv_splits)

    def combine(y_local: torch.Tensor, weights: torch.Tensor, route: _Route) -> torch.Tensor:
        inverse = torch.empty_like(route.regroup)
        inverse[route.regroup] = torch.arange(route.regroup.shape[0], device=route.regroup.device)
        y_recv = y_local[inverse]
        y_sorted = compat.wait_collective(compat.all_to_all_single_autograd(y_recv, route.send_splits, route.recv_splits, group))
        return base_combine(moe, y_sorted, weights, route.order)

    moe.__dict__["dispatch"] = dispatch
    moe.__dict__["combine"] = combine
    moe._xplan_ep = ep  # type: ignore[attr-defined]
    moe._xplan_ep_group = group  # type: ignore[attr-defined]
    moe._xplan_received = []  # type: ignore[attr-defined]
    return moe


def step_imbalance(model: nn.Module) -> float | None:
    """The busiest EP rank's routed load over the mean, averaged over the MoE layer calls since
    the last call (each layer's dispatch recorded this rank's received rows): one all-reduce of
    the loads (max and sum) over the EP group. None without expert parallelism or calls. Every
    EP rank must call it (a collective)."""
    blocks = [m for m in moe_blocks(model) if getattr(m, "_xplan_ep", 1) > 1]
    loads = [load for m in blocks for load in m._xplan_received]
    for m in blocks:
        m._xplan_received = []
    if not blocks or not loads:
        return None
    group, ep = blocks[0]._xplan_ep_group, blocks[0]._xplan_ep
    peak = torch.tensor(loads, dtype=torch.float64)
    total = peak.clone()
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    mean = total / ep
    ratios = [p / m for p, m in zip(peak.tolist(), mean.tolist(), strict=True) if m > 0]
    return sum(ratios) / len(ratios) if ratios else None


class _OutsideRecomputeRegion:
    """Hooks that hide selective-recompute dispatch modes from FSDP2's hooks of a nested unit.

    Selective recompute replays the ops of the checkpointed block and requires the replay to meet
    the ops of the forward one for one. The FSDP2 hooks of the expert unit nested in a block do
    different work in forward and in the backward recompute (all-gather or not, reshard or not),
    so they are run with the SAC caching modes popped: their ops are neither cached nor replayed.
    Other modes (fake tensors in dry runs) stay active.
    """

    def __init__(self) -> None:
        self.popped: list[list] = []

    def leave(self, *unused) -> None:
        self.popped.append(compat.pop_dispatch_modes_while(compat.is_selective_checkpoint_mode))

    def reenter(self, *unused) -> None:
        if self.popped:
            compat.push_dispatch_modes(self.popped.pop())


def run_fsdp_hooks_outside_recompute(module: nn.Module) -> None:
    """Call after `fully_shard(module)` for a unit nested inside a checkpointed block."""
    guard = _OutsideRecomputeRegion()
    module.register_forward_pre_hook(guard.leave, prepend=True)
    module.register_forward_pre_hook(guard.reenter)
    module.register_forward_hook(guard.leave, prepend=True)
    module.register_forward_hook(guard.reenter, always_call=True)


def moe_blocks(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


__all__ = ["apply_expert_parallel", "local_experts_forward", "moe_blocks", "run_fsdp_hooks_outside_recompute",
           "shard_experts", "step_imbalance"]
