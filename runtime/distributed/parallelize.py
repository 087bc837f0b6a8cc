"""Apply a Layout to a model, torchtitan-style: precision (fp8 layers) → EP → Ulysses → token tiling,
recompute → offload → FSDP2 (or ZeRO-1 for `dp_mode: zero1`, `zero1.py`).

Loss-normalisation contract (the train loop relies on it)
---------------------------------------------------------
Every gradient reduction is a plain SUM (FSDP2 `set_gradient_divide_factor(1.0)` with sum-only
collectives; no averaging over data-parallel or sequence-parallel ranks anywhere). So on each
rank the train loop must backpropagate

    loss = (sum of this rank's token losses over all its micro-batches) / global_tokens

where ``global_tokens`` is the number of non-ignored labels of the *whole global batch* (every
data-parallel rank, every sequence chunk, every micro-batch; `LocalBatch.global_tokens`). The summed
gradient is then exactly the gradient of the global-batch mean token loss, whatever the layout,
and equals the world-size-1 gradient. The value to log is `global_loss(loss, meshes)` (the sum of
the per-rank losses). Gradient clipping must use `clip_grad_norm_` here: parameters live on
different meshes (dense vs expert) and a naive norm double-counts replicas. Under ZeRO-1 the
gradients reach their optimizer shards in `reduce_gradients` (after the last micro-batch), the
optimizer steps on `optimizer_parameters` and `bind_optimizer` gathers the updated parameters.

Contract on the input model: built in float32 (the FSDP2 master weights), initialised identically
on every rank (e.g. `build_model(config, seed=...)`), not yet wrapped. `precision` ``bf16``/``fp8``
computes in bf16 with fp32 gradient reduction; ``fp32`` computes and reduces in the model dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from xplan.errors import InputError
from xplan.layout import Layout, check_layout, runtime_refusals

from ..models.moe import MoE
from ..models.tiling import TokenTiling
from ..precision import apply_precision, require_torchao
from ..recompute import apply_recompute
from .expert_parallel import apply_expert_parallel, run_fsdp_hooks_outside_recompute
from .mesh import Meshes
from .offload import OffloadLabels, apply_activation_offload, fsdp_offload_policy
from .reshard import keeps_gathered, mark_kept
from .ulysses import apply_ulysses, apply_ulysses_images
from .zero1 import apply_zero1, zero1_of

log = logging.getLogger("xplan.runtime.distributed")


def check_runtime_layout(layout: Layout, config, seq_len: int | None = None, global_batch: int | None = None,
                         world_size: int | None = None, device_type: str | None = None) -> None:
    """The planner's layout checks plus what this runtime executes (declared with each knob in
    xplan.layout; on `device_type` when given); raises InputError."""
    if layout.tp > 1 or layout.pp > 1 or layout.vpp > 1:
        raise InputError(f"the runtime does not execute tensor or pipeline parallelism yet (tp={layout.tp}, "
                         f"pp={layout.pp}, vpp={layout.vpp}); choose a layout with tp = pp = vpp = 1 "
                         "(e.g. `xplan search ... --tp 1 --pp 1`).")
    refusals = runtime_refusals(layout, device_type)
    if refusals:
        raise InputError(f"the runtime would not execute this layout as priced: {'; '.join(refusals)}. "
                         "Change those values (`xplan whatif PLAN --set key=value` shows the cost) or re-run "
                         "`xplan search`, which writes only layouts the runtime executes.")
    if layout.precision == "fp8":
        require_torchao()
    if world_size is not None and world_size != layout.ranks:
        raise InputError(f"the layout runs on {layout.ranks_text()} but the run has {world_size} processes.")
    check_layout(layout, config, seq_len if seq_len is not None else layout.sp, global_batch)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    if precision == "fp32":
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _even_placement(group_size: int, last_dim: int | None = None):
    """Shard a parameter whose dim 0 the group does not divide on the first dim (up to `last_dim`)
    it divides (FSDP2 shards dims other than 0 only evenly): dim 0 is padded to the group, so
    InternViT's position embedding [1, 1025, hidden] on dim 0 would gather `group` rows for one
    (Shard(2) when the group divides hidden)."""
    def placement(param: nn.Parameter) -> Shard:
        shape = (param.to_local() if isinstance(param, DTensor) else param).shape
        if not shape or shape[0] % group_size == 0:
            return Shard(0)
        dims = shape if last_dim is None else shape[:last_dim + 1]
        return Shard(next((d for d, size in enumerate(dims) if size % group_size == 0), 0))

    return placement


def _expert_placement(num_experts: int, group_size: int):
    """Stacked experts [experts, ...] on dim 1 when dim 0 would need padding (experts < shard group)."""
    return _even_placement(group_size, last_dim=1) if num_experts else None


def parallelize(model: nn.Module, layout: Layout, meshes: Meshes, *, expert_imbalance: float = 1.0,
                fp8_recipe: str = "tensorwise", offload_labels: OffloadLabels | None = None) -> nn.Module:
    """Apply `layout` to `model` in place and return it (see the module docstring for the contracts).

    `expert_imbalance` is the busiest EP rank's load over the mean, used only under fake tensors;
    `fp8_recipe` is the scaling of fp8 GEMMs (`runtime.precision`); `offload_labels` tells an
    observer (the dry run) which copies live in host memory.
    """
    config = model.config
    check_runtime_layout(layout, config, world_size=meshes.world_size)
    blocks = list(model.model.layers)

    # 0. Precision: fp8 linear layers replace nn.Linear before any wrapper sees the model.
    apply_precision(model, layout.precision, fp8_recipe, meshes.device_type)

    # 1. Expert parallel: slice routed experts, all-to-all dispatch/combine.
    if layout.ep > 1:
        for block in blocks:
            if isinstance(block.mlp, MoE):
                apply_expert_parallel(block.mlp, meshes.ep, fake_imbalance=expert_imbalance)

    # 2. Ulysses around every attention product.
    if layout.sp > 1:
        for block in blocks:
            apply_ulysses(block.self_attn, layout.sp, meshes.sp_rank, meshes.sp_group)
        if hasattr(model, "vision_tower"):  # each rank's share of the images, features all-gathered
            apply_ulysses_images(model, meshes.sp_group)

    # 3. Token tiling of each block's feed-forward half, recompute, then activation offload hooks
    # (around the checkpointed block).
    tiling = TokenTiling(tile_tokens=layout.tile_tokens) if layout.tile_tokens else None
    for block, policy in zip(blocks, layout.recompute_policies(len(blocks)), strict=True):
        block.token_tiling = tiling
        apply_recompute(block, policy)
    apply_activation_offload(blocks, layout, meshes.device_type, labels=offload_labels)
    if hasattr(model, "vision_tower"):  # the vision tower's layers: a recompute setting of their own
        for layer in model.vision_tower.encoder.layer:
            apply_recompute(layer, layout.vision_recompute)

    # 4a. ZeRO-1: replicated compute-dtype parameters, fp32 optimizer shards; no FSDP2 units.
    if layout.zero1:
        host = meshes.device_type != "cpu" and any(k in layout.offload for k in ("optimizer", "params"))
        apply_zero1(model, meshes, torch.float32 if layout.precision == "fp32" else torch.bfloat16, offload=host)
        model._xplan_layout = layout  # type: ignore[attr-defined]
        log.info("parallelized %s: zero1 over %d ranks, ep=%d sp=%d recompute=%s precision=%s", config.name,
                 meshes.world_size, layout.ep, layout.sp, layout.recompute, layout.precision)
        return model

    # 4b. FSDP2: experts (own mesh), blocks, embeddings, head, root. A single fp32 rank without
    # offload has nothing to shard, cast or move: FSDP would only add per-parameter copies.
    if meshes.world_size == 1 and layout.precision == "fp32" and not layout.offload:
        model._xplan_layout = layout  # type: ignore[attr-defined]
        log.info("parallelized %s: single fp32 rank, no FSDP wrapping", config.name)
        return model
    common = dict(mp_policy=mixed_precision(layout.precision),
                  offload_policy=fsdp_offload_policy(layout, meshes.device_type))
    units: list[FSDPModule] = []
    expert_units: dict[int, nn.Module] = {}
    kept: list[FSDPModule] = []  # units gathered across micro-batches (runtime.distributed.reshard)
    for i, block in enumerate(blocks):
        mlp = block.mlp
        reshard = not keeps_gathered(block, layout)
        if isinstance(mlp, MoE) and layout.ep > 1:
            fully_shard(mlp.experts, mesh=meshes.expert_fsdp, reshard_after_forward=reshard,
                        shard_placement_fn=_expert_placement(config.num_experts, layout.expert_fsdp), **common)
            run_fsdp_hooks_outside_recompute(mlp.experts)
            expert_units[i] = mlp.experts
            units.append(mlp.experts)
            kept += [] if reshard else [mlp.experts]
        placement = None
        if isinstance(mlp, MoE) and layout.ep == 1:
            expert_params = {id(p) for p in mlp.experts.parameters()}
            expert_fn = _expert_placement(config.num_experts, layout.fsdp)

            def placement(p, _ids=expert_params, _fn=expert_fn):
                return _fn(p) if id(p) in _ids else Shard(0)
        fully_shard(block, mesh=meshes.fsdp, reshard_after_forward=reshard, shard_placement_fn=placement, **common)
        units.append(block)
        kept += [] if reshard else [block]
    if hasattr(model, "vision_tower"):
        # Units of their own for the patch embeddings, each vision layer and the projector, each
        # resharded after its forward: in the root unit (never resharded) they would stay gathered
        # through the whole step, which the planner does not price (it runs first and last anyway).
        # keep_gathered 'vision': the layers and projector stay gathered across the step's
        # micro-batches (one all-gather per step); the patch embeddings are resharded anyway (their
        # position embedding's dim 0 of 1 row is padded to the group when no other dim splits evenly).
        keep = "vision" in layout.keep_gathered
        even = _even_placement(meshes.fsdp.size(meshes.fsdp.ndim - 1))
        for unit in (model.vision_tower.embeddings, *model.vision_tower.encoder.layer, model.multi_modal_projector):
            reshard = not keep or unit is model.vision_tower.embeddings
            fully_shard(unit, mesh=meshes.fsdp, reshard_after_forward=reshard, shard_placement_fn=even, **common)
            units.append(unit)
            kept += [] if reshard else [unit]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if not tied:
        fully_shard(model.model.embed_tokens, mesh=meshes.fsdp, reshard_after_forward=True, **common)
        fully_shard([model.model.norm, model.lm_head], mesh=meshes.fsdp, reshard_after_forward=False, **common)
        units += [model.model.embed_tokens, model.lm_head]
    fully_shard(model, mesh=meshes.fsdp, reshard_after_forward=False, **common)
    units.append(model)

    mark_kept(model, kept)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # SUM: see the loss-normalisation contract
        unit.set_force_sum_reduction_for_comms(True)

    # Explicit prefetch: a block's own expert unit from the block's pre-forward / pre-backward (its
    # all-gather overlaps attention), the next block in forward, the previous one in backward.
    if hasattr(model, "vision_tower"):  # the vision tower's units likewise, in their order
        chain = [model.vision_tower.embeddings, *model.vision_tower.encoder.layer, model.multi_modal_projector]
        for i, unit in enumerate(chain):
            unit.set_modules_to_forward_prefetch(chain[i + 1:i + 2])
            unit.set_modules_to_backward_prefetch(chain[i - 1:i] if i > 0 else [])
    for i, block in enumerate(blocks):
        own = [expert_units[i]] if i in expert_units else []
        block.set_modules_to_forward_prefetch(own + ([blocks[i + 1]] if i + 1 < len(blocks) else []))
        block.set_modules_to_backward_prefetch(own + ([blocks[i - 1]] if i > 0 else []))
    model._xplan_layout = layout  # type: ignore[attr-defined]
    log.info("parallelized %s: fsdp=%d (x%d replicas) ep=%d sp=%d recompute=%s tile_tokens=%s precision=%s",
             config.name, layout.fsdp, layout.hsdp_replicas, layout.ep, layout.sp, layout.recompute,
             layout.tile_tokens, layout.precision)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _expert_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}


def _gradient_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors whose `.grad` the optimizer will use: the parameters, or ZeRO-1's shards."""
    zero = zero1_of(model)
    return [master for _, master in zero.named_masters()] if zero else list(model.parameters())


def _square_sum(tensors, device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in tensors:
        if p.grad is not None:
            total += _local(p.grad).float().pow(2).sum()
    return total


@torch.no_grad()
def grad_norm(model: nn.Module, meshes: Meshes) -> torch.Tensor:
    """Global L2 norm of all gradients (dense and expert), identical on every rank.

    Each local gradient shard is summed once: dense shards are unique within the dense shard group
    (`fsdp` consecutive ranks) and replicated across HSDP replicas; expert shards are unique within
    efsdp × ep ranks (the same group when fsdp >= ep; the EP group when fsdp = 1). ZeRO-1's
    shards are unique over all ranks.
    """
    layout = meshes.layout
    if zero1_of(model) is not None:
        total = _square_sum(_gradient_tensors(model), meshes.device)
        if meshes.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.sqrt()
    if layout.ep > 1 and layout.fsdp < layout.ep:  # experts split over EP ranks, dense weights replicated
        experts = _expert_parameter_ids(model)
        dense = _square_sum((p for p in model.parameters() if id(p) not in experts), meshes.device)
        expert = _square_sum((p for p in model.parameters() if id(p) in experts), meshes.device)
        dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=meshes.ep_group)
        return (dense + expert).sqrt()
    total = _square_sum(model.parameters(), meshes.device)
    if layout.fsdp > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=meshes.shard_group)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, meshes: Meshes) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.

    Same rule as `torch.nn.utils.clip_grad_norm_` (coefficient max_norm / (norm + 1e-6), at most 1).
    """
    norm = grad_norm(model, meshes)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in _gradient_tensors(model):
            if p.grad is not None:
                _local(p.grad).mul_(coef.to(p.grad.dtype))
    return norm


def reduce_gradients(model: nn.Module) -> None:
    """End of a step's backward passes: ZeRO-1 reduce-scatters the accumulated gradients onto this
    rank's optimizer shards; FSDP2 already reduced them during backward (nothing to do)."""
    zero = zero1_of(model)
    if zero is not None:
        zero.reduce_gradients()


def optimizer_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, tensor) the optimizer updates: the trainable parameters, or under ZeRO-1 this rank's
    fp32 shards of them (same names, same global shapes)."""
    zero = zero1_of(model)
    if zero is not None:
        return zero.named_masters()
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def bind_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Call once the optimizer over `optimizer_parameters(model)` exists (ZeRO-1 all-gathers the
    updated shards into the model's parameters after every step)."""
    zero = zero1_of(model)
    if zero is not None:
        zero.bind(optimizer)


@torch.no_grad()
def global_loss(local_loss: torch.Tensor, meshes: Meshes) -> torch.Tensor:
    """The global-batch loss for logging: the sum over all ranks of the per-rank normalised losses."""
    total = local_loss.detach().float().clone()
    if meshes.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


__all__ = ["bind_optimizer", "check_runtime_layout", "clip_grad_norm_", "global_loss", "grad_norm",
           "mixed_precision", "optimizer_parameters", "parallelize", "reduce_gradients"]
