"""Device meshes for one Layout, built once, and the batch slice each rank trains on.

All meshes are views of one 1-D world mesh (`compat.unflatten_mesh`), so FSDP2 can combine the
expert mesh with the expert-parallel mesh into one SPMD mesh. Rank arithmetic (xplan.layout):

    world = hsdp_replicas × fsdp                      dense weights:  (dp_replicate, dp_shard)
    world = expert_replicas × expert_fsdp × ep        routed experts: (dp_replicate, efsdp, ep)
    world = data_parallel × sp                        data:           (dp, sp)

With a shard group of at least `ep` ranks, expert_fsdp = fsdp / ep and the expert replicas are the
HSDP replicas. With fsdp = 1 (ddp, zero1) the experts are replicated over world / ep ranks
(Megatron's expert-data-parallel group), which may exceed the dense weights' replication.

Innermost dimensions are consecutive ranks: a shard group is `fsdp` consecutive ranks, an EP
group `ep` consecutive ranks inside it (the all-to-all stays inside a node), a Ulysses group
`sp` consecutive ranks. The data-parallel rank (`rank // sp`) picks the sequences, the
sequence-parallel rank (`rank % sp`) picks the chunk of each sequence.

Batch contract (`local_batch`): the data pipeline produces the same global batch on every rank
(`[global_batch, seq_len]` token ids, independent of the world size). Labels are made by shifting
the *full* sequence (label[t] = token[t + 1], the last position ignored with -100), then input
ids, labels and global positions are split: rows by data-parallel rank, columns by
sequence-parallel rank. The normaliser is the number of non-ignored labels of the whole global
batch (`LocalBatch.global_tokens`), known on every rank without communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xplan.errors import InputError
from xplan.layout import Layout

from ..compat import unflatten_mesh

IGNORE_INDEX = -100

_MESH_CACHE: dict[tuple, Any] = {}  # layout shape -> mesh views (and zero1's expert mesh)


@dataclass(frozen=True)
class Meshes:
    """Every mesh and rank coordinate a layout needs on this rank.

    - `fsdp`: the dense FSDP mesh, 1-D ``(dp_shard,)`` or, with HSDP replicas, 2-D
      ``(dp_replicate, dp_shard)``; dense gradients are summed over all of it (= every rank).
    - `expert_fsdp`: the mesh routed experts are FSDP-sharded over after EP, 1-D ``(efsdp,)`` or
      2-D ``(dp_replicate, efsdp)``; `ep`: the 1-D expert-parallel mesh (all-to-all group);
      `expert_replicate`: the 1-D mesh of the ranks holding the same experts' shard (size
      world / (expert_fsdp × ep); ZeRO-1 shards the experts' optimizer states over it).
    - `sp`: the 1-D Ulysses mesh; `dp_rank`/`dp_size`: which sequences of the global batch this
      rank holds; `sp_rank`/`sp_size`: which chunk of each sequence.
    """

    layout: Layout
    device_type: str
    device: torch.device
    rank: int
    world_size: int
    world: DeviceMesh
    dense: DeviceMesh  # always 2-D (dp_replicate, dp_shard)
    fsdp: DeviceMesh
    expert: DeviceMesh  # always 3-D (dp_replicate, efsdp, ep)
    expert_fsdp: DeviceMesh
    ep: DeviceMesh
    expert_replicate: DeviceMesh
    data: DeviceMesh  # 2-D (dp, sp)
    sp: DeviceMesh
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    ep_rank: int
    ep_size: int

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.sp.get_group()

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.ep.get_group()

    @property
    def shard_group(self) -> dist.ProcessGroup:
        """The `fsdp` consecutive ranks that together hold one copy of every parameter."""
        return self.dense.get_group("dp_shard")

    @property
    def hsdp_replicas(self) -> int:
        return self.layout.hsdp_replicas


def _mesh_views(device_type: str, world: int, replicas: int, fsdp: int, ep: int, sp: int) -> dict[str, DeviceMesh]:
    key = (device_type, world, replicas, fsdp, ep, sp)
    cached = _MESH_CACHE.get(key)
    if cached is not None:
        return cached
    expert_fsdp = max(1, fsdp // ep)
    expert_replicas = world // (expert_fsdp * ep)
    root = init_device_mesh(device_type, (world,), mesh_dim_names=("world",))
    dense = unflatten_mesh(root, 0, (replicas, fsdp), ("dp_replicate", "dp_shard"))
    expert = unflatten_mesh(root, 0, (expert_replicas, expert_fsdp, ep), ("dp_replicate", "efsdp", "ep"))
    data = unflatten_mesh(root, 0, (world // sp, sp), ("dp", "sp"))
    views = {
        "world": root,
        "dense": dense,
        "fsdp": dense if replicas > 1 else dense["dp_shard"],
        "expert": expert,
        "expert_fsdp": expert["dp_replicate", "efsdp"] if expert_replicas > 1 else expert["efsdp"],
        "ep": expert["ep"],
        "expert_replicate": expert["dp_replicate"],
        "data": data,
        "sp": data["sp"],
    }
    _MESH_CACHE[key] = views
    return views


def clear_mesh_cache() -> None:
    """Forget cached meshes (call before destroying the process groups they use)."""
    _MESH_CACHE.clear()


def build_meshes(layout: Layout, device_type: str = "cpu") -> Meshes:
    """The meshes of `layout` for this rank (the default process group must exist).

    Meshes are cached per shape, so building the same layout again (or another layout with the
    same replicate/shard/ep/sp sizes) creates no new process groups.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_meshes needs the default process group: call init_distributed first")
    world = dist.get_world_size()
    if layout.tp > 1 or layout.pp > 1:
        raise InputError(f"the runtime does not execute tensor or pipeline parallelism yet (tp={layout.tp}, "
                         f"pp={layout.pp}); plan with --tp 1 --pp 1.")
    if layout.ranks != world:
        raise InputError(f"the layout runs on {layout.ranks_text()} but {world} processes were launched; "
                         f"launch {layout.ranks} processes (torchrun --nproc-per-node ...) or re-plan.")
    # Experts are split over EP ranks inside a shard group, or over all ranks when nothing is sharded.
    ep_whole = layout.fsdp if layout.fsdp > 1 else world
    for name, size, whole in (("fsdp", layout.fsdp, world), ("sp", layout.sp, world), ("ep", layout.ep, ep_whole)):
        if whole % size:
            raise InputError(f"{name} ({size}) must divide {whole}.")
    views = _mesh_views(device_type, world, layout.hsdp_replicas, layout.fsdp, layout.ep, layout.sp)
    rank = dist.get_rank()
    device = torch.device(device_type, torch.accelerator.current_device_index()) if device_type != "cpu" \
        else torch.device("cpu")
    return Meshes(
        layout=layout, device_type=device_type, device=device, rank=rank, world_size=world,
        world=views["world"], dense=views["dense"], fsdp=views["fsdp"], expert=views["expert"],
        expert_fsdp=views["expert_fsdp"], ep=views["ep"], expert_replicate=views["expert_replicate"],
        data=views["data"], sp=views["sp"],
        dp_rank=rank // layout.sp, dp_size=world // layout.sp, sp_rank=rank % layout.sp, sp_size=layout.sp,
        ep_rank=rank % layout.ep, ep_size=layout.ep,
    )


@dataclass(frozen=True)
class LocalBatch:
    """This rank's share of a global batch.

    `input_ids`, `labels`, `positions`: [global_batch / dp_size, seq_len / sp_size]. `positions` are
    global (RoPE must see where the chunk sits in the sequence). `global_tokens`: non-ignored labels
    in the whole global batch, the loss normaliser on every rank.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    global_tokens: int

    def micro_batches(self, micro_batch: int) -> list[LocalBatch]:
        """Split the rows into chunks of `micro_batch` sequences (gradient accumulation)."""
        rows = self.input_ids.shape[0]
        if micro_batch < 1 or rows % micro_batch:
            raise InputError(f"micro_batch ({micro_batch}) must divide this rank's {rows} sequences.")
        return [LocalBatch(self.input_ids[i:i + micro_batch], self.labels[i:i + micro_batch],
                           self.positions[i:i + micro_batch], self.global_tokens)
                for i in range(0, rows, micro_batch)]


def shift_labels(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """label[t] = token[t + 1] on the full sequence; the last position is ignored."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def local_batch(global_input_ids: torch.Tensor, meshes: Meshes, global_labels: torch.Tensor | None = None,
                global_positions: torch.Tensor | None = None) -> LocalBatch:
    """This rank's rows and sequence chunk of a global batch [global_batch, seq_len].

    Labels default to `shift_labels(global_input_ids)` (shift on the full sequence, then split);
    pass `global_labels` (-100 = ignored) and/or `global_positions` for packed or masked data.
    Tensors stay on the device of the inputs.
    """
    if global_input_ids.dim() != 2:
        raise InputError(f"the global batch must be [sequences, seq_len], got shape {tuple(global_input_ids.shape)}.")
    batch, seq = global_input_ids.shape
    if batch % meshes.dp_size:
        raise InputError(f"global batch ({batch} sequences) must be a multiple of the data-parallel size "
                         f"({meshes.dp_size} = ranks / sp).")
    if seq % meshes.sp_size:
        raise InputError(f"seq_len ({seq}) must be a multiple of sp ({meshes.sp_size}).")
    labels = shift_labels(global_input_ids) if global_labels is None else global_labels
    if global_positions is None:
        global_positions = torch.arange(seq, device=global_input_ids.device).expand(batch, seq)
    rows, cols = batch // meshes.dp_size, seq // meshes.sp_size
    r0, c0 = meshes.dp_rank * rows, meshes.sp_rank * cols

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[r0:r0 + rows, c0:c0 + cols].contiguous()

    # Shifted labels ignore exactly the last position of every sequence (no data needed: works
    # under fake tensors); given labels are counted.
    tokens = batch * (seq - 1) if global_labels is None else int((labels != IGNORE_INDEX).sum())
    return LocalBatch(take(global_input_ids), take(labels), take(global_positions), tokens)


__all__ = ["IGNORE_INDEX", "LocalBatch", "Meshes", "build_meshes", "clear_mesh_cache", "local_batch", "shift_labels"]
