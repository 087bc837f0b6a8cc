"""Communication time of each parallelism, on the hierarchy level its group spans.

Rank order (row-major mesh, innermost last): [hsdp replica][expert-fsdp][ep] for model states,
with Ulysses (sp) and EP groups on consecutive ranks so they stay inside the fastest level.
Every function returns seconds for one occurrence on one rank.
"""

from __future__ import annotations

from .kernels import alpha_beta_time, collective_bandwidth, collective_time, memory_time


def ring_bandwidth(profile, kind: str, group: int, stride: int, devices: int) -> float:
    """Bus bandwidth (bytes/s per device, NCCL busBw sense) of a ring collective over `group` ranks.

    Inside one level it is that level's per-device bandwidth. A group that spans several units of
    the level below its own (e.g. FSDP over 64 GPUs = 8 nodes) with `local` members per unit
    runs one ring per member's NIC: every ring crosses each unit boundary once, so a unit's
    `local` NICs carry the outer hops side by side while the inner hops stay on the inner links.
    busBw = min(inner level bandwidth, local x outer per-device bandwidth). NCCL shows exactly
    this: two 8xA100 nodes with 4x200 Gb/s reach 86 GB/s all-reduce busBw (NVIDIA/nccl #1048) and
    3 nodes with 4 HDR NICs 85-96 GB/s (NVIDIA/nccl-tests #119), i.e. the node's NIC total, not
    the 24 GB/s of one NIC; with a NIC per GPU it rises to the NVLink bandwidth (sjeaugey,
    NVIDIA/nccl #412). A group with one member per unit (stride >= unit) gets one NIC's worth.
    """
    level = profile.level_for_group(group, stride, devices)
    outer = collective_bandwidth(profile, level, kind, group)
    if level == 0:
        return outer
    inner_devices = profile.levels[level - 1].devices or group * stride
    local = min(group, max(1, inner_devices // stride))
    if local <= 1:
        return outer
    inner = collective_bandwidth(profile, level - 1, kind, local)
    return min(inner, local * outer)


def ring_collective_time(profile, kind: str, nbytes: float, group: int, stride: int, devices: int) -> float:
    """Alpha-beta time of a ring all-gather / reduce-scatter / all-reduce at `ring_bandwidth`.

    `nbytes` as in `kernels.collective_terms`: the full gathered output (all_gather), the full
    input (reduce_scatter), the buffer (all_reduce). One latency of the outermost level spanned
    per ring step.
    """
    if group <= 1 or nbytes <= 0:
        return 0.0
    level = profile.level_for_group(group, stride, devices)
    return alpha_beta_time(kind, nbytes, group, profile.latency(level),
                           ring_bandwidth(profile, kind, group, stride, devices))


def all_gather_time(profile, nbytes: float, group: int, stride: int, devices: int) -> float:
    """Ring all-gather producing `nbytes` (the full unsharded buffer)."""
    return ring_collective_time(profile, "all_gather", nbytes, group, stride, devices)


def reduce_scatter_time(profile, nbytes: float, group: int, stride: int, devices: int) -> float:
    """Ring reduce-scatter of an `nbytes` input (the full unsharded gradient)."""
    return ring_collective_time(profile, "reduce_scatter", nbytes, group, stride, devices)


def all_reduce_time(profile, nbytes: float, group: int, stride: int, devices: int) -> float:
    return ring_collective_time(profile, "all_reduce", nbytes, group, stride, devices)


def all_to_all_time(profile, nbytes: float, group: int, stride: int, devices: int) -> float:
    """All-to-all where each rank sends `nbytes` in total (its share to itself included).

    Hierarchical: a group that spans several innermost units sends to its peers in the same
    unit over that unit's links while the rest crosses the outer level, concurrently.
    """
    if group <= 1 or nbytes <= 0:
        return 0.0
    level = profile.level_for_group(group, stride, devices)
    inner = profile.levels[0].devices
    local = min(group, max(1, (inner or group) // stride))
    if level == 0 or local <= 1:
        return collective_time(profile, "all_to_all", nbytes, group, stride, devices)
    local_bytes = nbytes * (local - 1) / group
    remote_bytes = nbytes * (group - local) / group
    t_local = local_bytes / collective_bandwidth(profile, 0, "all_to_all", local)
    t_remote = remote_bytes / collective_bandwidth(profile, level, "all_to_all", group)
    return (group - 1) * profile.latency(level) + max(t_local, t_remote)


def p2p_time(profile, nbytes: float, stride: int, devices: int) -> float:
    return collective_time(profile, "p2p", nbytes, 2, stride, devices)


def fsdp_block_times(profile, dense_numel: float, routed_numel: float, layout, param_bytes: int,
                     reduce_bytes: int) -> tuple[float, float]:
    """(all-gather, reduce-scatter) seconds for one block.

    Dense weights are sharded over the `fsdp` consecutive ranks; routed experts (already split
    by EP) over the `expert_fsdp` ranks `ep` apart. Both groups run their collectives in turn.
    """
    d = layout.ranks
    stride_tp = layout.tp
    ag = all_gather_time(profile, dense_numel * param_bytes, layout.fsdp, stride_tp, d)
    rs = reduce_scatter_time(profile, dense_numel * reduce_bytes, layout.fsdp, stride_tp, d)
    if routed_numel:
        ag += all_gather_time(profile, routed_numel * param_bytes, layout.expert_fsdp, layout.ep * stride_tp, d)
        rs += reduce_scatter_time(profile, routed_numel * reduce_bytes, layout.expert_fsdp,
                                  layout.ep * stride_tp, d)
    return ag, rs


def expert_parallel_time(profile, tokens: float, hidden: int, top_k: int, layout, act_bytes: int,
                         imbalance: float) -> float:
    """EP dispatch + combine, forward and backward (4 all-to-alls) for one MoE layer.

    Each rank sends its tokens' top-k copies (`tokens * top_k * hidden` activations); the busiest
    rank receives `imbalance` times the mean. The EP group's ranks sit `expert_tp` apart (expert
    tensor parallelism innermost, as Megatron lays out its expert mesh): tp apart when experts
    are tensor-parallel, consecutive when EP spans the tensor-parallel ranks.
    """
    if layout.ep <= 1:
        return 0.0
    nbytes = tokens * top_k * hidden * act_bytes * imbalance
    return 4 * all_to_all_time(profile, nbytes, layout.ep, layout.expert_tp, layout.ranks)


def ulysses_time(profile, tokens: float, q_width: int, kv_width: int, out_width: int, layout,
                 act_bytes: int) -> float:
    """Ulysses: q, k, v to head-sharded and the output back, forward and mirrored in backward.

    `tokens` is this rank's sequence shard; widths are heads × head_dim of q, of k plus v (after
    any kv-head repetition), and of the attention output.
    """
    if layout.sp <= 1:
        return 0.0
    per_pass = tokens * (q_width + kv_width + out_width) * act_bytes
    return 2 * all_to_all_time(profile, per_pass, layout.sp, layout.tp, layout.ranks)


def tensor_parallel_time(profile, tokens: float, hidden: int, layout, act_bytes: int, routed_copies: float = 0.0,
                         dense_mlp: bool = True) -> float:
    """Megatron TP with sequence parallelism, one layer forward and backward: the attention's
    all-gather and reduce-scatter of the activations each pass, and the MLP's: a dense MLP (or an
    MoE layer's shared expert, `dense_mlp`) the same; routed experts split over expert_tp > 1 ranks
    all-gather the tokens the EP all-to-all brought them and reduce-scatter their outputs over the
    expert-TP group (Megatron's alltoall dispatcher: gather_from_sequence_parallel_region after the
    dispatch, reduce_scatter_to_sequence_parallel_region before the combine), `routed_copies` =
    top-k x imbalance times a dense MLP's bytes; with expert TP 1 (EP spanning the TP ranks) the
    experts run on each rank's own sequence shard and need none. `tokens` is the whole micro-batch
    sequence (each TP rank holds tokens / tp of it between the collectives)."""
    if layout.tp <= 1:
        return 0.0
    full = tokens * hidden * act_bytes  # the micro-batch's activation, gathered over the TP group

    def one(nbytes: float, group: int) -> float:
        return all_gather_time(profile, nbytes, group, 1, layout.ranks) + reduce_scatter_time(
            profile, nbytes, group, 1, layout.ranks)

    total = 2 * one(full, layout.tp) * (2 if dense_mlp else 1)
    if routed_copies and layout.expert_tp > 1:
        total += 2 * one(full * routed_copies, layout.expert_tp)
    return total


#: Share of the SMs a GEMM gives up while Transformer Engine's userbuffers overlap its TP collective
#: by the `pipeline` or `bulk` method: num_sm 16 with set_sm_margin (the GEMM launched on the SMs
#: left), of a GH100's 132 (transformer_engine/pytorch/module/base.py initialize_ub,
#: get_default_config). The `ring_exchange` method copies with the copy engines (num_sm 1, no margin).
TP_OVERLAP_SM_SHARE = 16 / 132
#: TE's default method per overlapped GEMM (initialize_ub `methods`): pipeline for proj_fprop and
#: fc2_fprop (row-parallel forward), bulk for qkv and fc1 dgrad and wgrad (column-parallel
#: backward); ring_exchange for the others.
ROW_PARALLEL = ("o_proj", "down_proj")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "q_b_proj",
                   "kv_b_proj")


def under_tp_sm_margin(module: str, phase: str) -> bool:
    """Whether the dense GEMM of `module` in `phase` runs beside a userbuffers collective that keeps
    `TP_OVERLAP_SM_SHARE` of the SMs (Megatron --tp-comm-overlap with TE's default methods):
    row-parallel forward (pipeline), column-parallel backward (bulk). Routed experts are not
    overlapped that way."""
    if ".experts" in module:
        return False
    name = module.rsplit(".", 1)[-1]
    return name in ROW_PARALLEL if phase == "forward" else name in COLUMN_PARALLEL


def tp_overlap_sm_time(margin_gemm: float) -> float:
    """Seconds the GEMMs under the SM margin (`margin_gemm` seconds on every SM) take beyond that:
    they run on 1 - `TP_OVERLAP_SM_SHARE` of the SMs."""
    return margin_gemm * TP_OVERLAP_SM_SHARE / (1.0 - TP_OVERLAP_SM_SHARE)


def pipeline_p2p_time(profile, tokens: float, hidden: int, layout, act_bytes: int) -> float:
    """Activations forward and gradients backward across one stage boundary per micro-batch."""
    if layout.pp <= 1:
        return 0.0
    stride = layout.ranks // layout.pp
    return 2 * layout.vpp * p2p_time(profile, tokens * hidden * act_bytes, stride, layout.ranks)


def fsdp_exposed_time(ag: float, rs: float, forward: float, backward: float, grad_accum: int, kept: bool,
                      overlap: bool) -> float:
    """Exposed seconds of one FSDP unit's collectives per micro-batch. With overlap, the forward's
    all-gather hides under the `forward` compute it is prefetched over and the backward's re-gather
    and reduce-scatter under `backward`; a unit kept gathered across micro-batches (keep_gathered)
    is gathered once per step and not again in the backward. Without overlap (gloo on CPU, whose
    cores also compute) everything is exposed."""
    if not overlap:
        return (1 / grad_accum if kept else 2) * ag + rs
    if kept:
        return max(0.0, ag - forward) / grad_accum + max(0.0, rs - backward)
    return max(0.0, ag - forward) + max(0.0, ag + rs - backward)


def fsdp2_copy_time(profile, numel: float, layout, param_bytes: int, reduce_bytes: int,
                    gathers: int) -> float:
    """FSDP2's copies around its collectives for one unit and micro-batch (memory-bound, read +
    write): per all-gather the copy-in of the shard and the copy-out into the unsharded
    parameters; per reduce-scatter the packing of the unsharded gradients and the accumulation of
    the reduced shard. Not paid with `fsdp_buffers: zero_copy`: Megatron-FSDP keeps parameters
    and gradients in the buffers its collectives read and write ("Zero copy communication is
    achieved by reorganizing the storage of parameters and main grad with ParamAndGradBuffer",
    Megatron-LM megatron/core/distributed/fsdp/src/README.md)."""
    shard = numel / layout.fsdp
    per_gather = 2 * shard * param_bytes + 2 * numel * param_bytes
    reduce = 2 * numel * reduce_bytes + 2 * shard * reduce_bytes
    return memory_time(profile, gathers * per_gather + reduce)
