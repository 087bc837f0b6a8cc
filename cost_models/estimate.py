"""Price one layout: step time with its breakdown, tokens/s/device, MFU and peak memory.

MFU (defined once, here): model FLOPs per token from the trace (forward + backward, causal
attention at half, recompute excluded) × tokens/s per device ÷ the device's dense bf16 peak.

Step time of the busiest rank:
    grad_accum × (compute + exposed communication of one micro-batch on the slowest pipeline rank)
  + pipeline bubble ((pp - 1) / vpp micro-batch slots of the mean rank, 1F1B / interleaved)
  + optimizer step (memory-bound on device, or over the host link when offloaded)
FSDP all-gathers and reduce-scatters overlap the neighbouring block's compute (prefetch depth 1);
what exceeds that compute is exposed. Expert-parallel and Ulysses all-to-alls and pipeline sends
sit on the critical path; TP collectives too, unless the layout's `tp_comm` is `overlapped` (then
only what exceeds the layer's GEMM time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xplan.layout import Layout, check_layout
from xplan.layout_tiles import feed_forward_tiles

from . import comm, pipeline
from .comm import fsdp2_copy_time
from .compute import PricingContext, RankWork, pricing_for
from .ep_overlap import overlap_micro, paired_share
from .images import VISION_PARTS, image_share, tower_params, vision_flops_per_token, vision_fsdp_exposed
from .kernels import eager_attention_time, memory_time
from .memory import (
    COMPUTE_BYTES,
    GIB,
    MemoryBreakdown,
    block_unsharded_numel,
    eager_attention_elements,
    grad_bytes,
    rank_param_split,
)
from .memos import holds, layout_key, memoised
from .offload import activation_copy_time, block_mlp_kind, optimizer_offload_time
from .peak_memory import fits_memory, host_capacity, memory_estimate  # noqa: F401  (fits_memory: API)
from .pipeline import PipelineRank, pipeline_ranks  # noqa: F401  (PipelineRank: part of this module's API)
from .routing import default_imbalance, imbalance_note
from .tiling import check_trace_tiles, expert_regather_times, tile_redo_share, tiled_expert_all_to_all_time

# What the runtime runs: torch's foreach AdamW (runtime/train/optim.py) makes 8 passes over fp32
# tensors - p *= 1 - lr*wd (8 B), lerp_ m (12), v *= b2 (8), addcmul_ v (12), sqrt(v) into a new
# tensor (8), /= bias correction (8), += eps (8), addcdiv_ p (16) = 80 B - and gradient-norm
# clipping reads the gradients (4 B) and scales them (8 B): 92 B per parameter.
OPTIMIZER_BYTES_PER_PARAM = 92


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    seq_len: int
    global_batch: int
    grad_accum: int
    memory: MemoryBreakdown
    time: dict[str, float]  # seconds per step by component
    step_time_s: float
    tokens_per_s_per_device: float
    mfu: float
    flops_per_token: float
    hbm_bytes: float
    host_bytes: float
    binding: str
    notes: list[str] = field(default_factory=list)
    imbalance: float = 1.0  # the busiest EP rank's routed load over the mean this estimate priced

    @property
    def fits(self) -> bool:
        return fits_memory(self.memory, self.hbm_bytes, self.host_bytes)

    node_ranks: int = 1  # ranks of this layout on one node (they share its host memory)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "memory_gib": self.memory.gib() | {"capacity": self.hbm_bytes / GIB,
                                               "host_capacity": self.host_bytes / GIB},
            "host_per_node_gib": {"needed": self.memory.offloaded_to_host * self.node_ranks / GIB,
                                  "capacity": self.host_bytes * self.node_ranks / GIB,
                                  "ranks": self.node_ranks},
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_device": self.tokens_per_s_per_device,
            "mfu": self.mfu,
            "layout": self.layout.to_dict(),
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "grad_accum": self.grad_accum,
            "time_s": dict(self.time),
            "flops_per_token": self.flops_per_token,
            "binding": self.binding,
            "imbalance": self.imbalance,
            "notes": list(self.notes),
        }


# What one micro-batch costs a rank on its critical path (the step's first time keys, in order).
MICRO_PARTS = ("compute", "recompute", "fsdp_exposed", "fsdp_copies", "expert_all_to_all", "ulysses_all_to_all",
               "tensor_parallel", "pipeline_p2p")


def rank_work(trace, layout: Layout, imbalance: float = 1.0, recompute_every_mm: int = 0,
              grad_accum: int = 1) -> RankWork:
    """How one rank of `layout` relates to the traced micro-batch (what `op_time` prices);
    `grad_accum`: the micro-batches of one step (fp8 weight casts are paid once per step)."""
    return RankWork(token_factor=layout.micro_batch / layout.sp, tp=layout.tp, ep=layout.ep,
                    expert_tp=layout.expert_tp, imbalance=imbalance,
                    precision=layout.precision, seq_len=trace.seq_len,
                    traced_dtype_bytes=2 if trace.dtype in ("bfloat16", "torch.bfloat16") else 4,
                    fused_elementwise=layout.kernels.get("elementwise", "fused") == "fused",
                    fused_norm=layout.kernels.get("norm", "auto") == "fused",
                    fused_loss=layout.kernels.get("loss") == "fused",
                    attention_kernel=layout.kernels.get("attention", "sdpa"),
                    moe_gemm=layout.kernels.get("moe_gemm", "grouped_mm"),
                    recompute_every_mm=recompute_every_mm if layout.recompute == "selective" else 0,
                    # Only fp8 GEMMs cast weights: other precisions share one work (and its memo).
                    weight_cast_share=1.0 / max(1, grad_accum) if layout.precision == "fp8" else 1.0)


def communication_terms(trace, config, layout: Layout, profile, imbalance: float = 1.0):
    """What one micro-batch's communication costs a rank, before overlap and recompute:
    ({block kind: (FSDP all-gather, FSDP reduce-scatter incl. the HSDP all-reduce, FSDP2 copies,
    EP all-to-alls, Ulysses all-to-alls, TP collectives, the expert unit's extra gathers under
    token tiling)}, (root unit's FSDP gather + reduce, its FSDP2 copies, pipeline p2p)); seconds,
    for the terms `estimate` uses.

    Communication depends on the sharding, not on recompute or offload (`estimate` applies
    their effects): the terms are priced on the layout without them and memoised on the trace
    per (that layout, imbalance, profile, config), so the recompute and offload variants of one
    layout a search prices share them. The memo holds the profile and config it was computed
    for, so their ids cannot name other objects.
    """
    memo = trace.__dict__.setdefault("_communication_terms", {})
    key = (layout_key(layout, without=("recompute", "vision_recompute", "offload", "keep_gathered", "allocator")),
           imbalance, id(profile), id(config))
    return memoised(memo, key, lambda: (profile, config, _communication_terms(
        trace, config, layout.with_changes(recompute="none", vision_recompute="none", offload=(), keep_gathered=()),
        profile, imbalance)))[2]


def _communication_terms(trace, config, layout: Layout, profile, imbalance: float):
    tokens = layout.micro_batch / layout.sp * trace.seq_len  # the micro-batch this TP group works on
    rank_tokens = tokens / layout.tp
    tiles = feed_forward_tiles(layout, trace.seq_len)
    act_bytes = param_bytes = COMPUTE_BYTES[layout.precision]
    reduce_bytes = 4
    fsdp2 = not layout.zero1 and layout.fsdp > 1
    copied = fsdp2 and layout.fsdp_buffers == "copy"  # Megatron-FSDP's zero-copy buffers: no copies
    hidden = config.hidden_size
    q_width = config.num_heads * config.qk_head_dim
    kv_heads = config.num_heads if config.attention_kind == "mla" else max(config.num_kv_heads, layout.sp)
    kv_width = kv_heads * (config.qk_head_dim + config.v_dim)
    out_width = config.num_heads * config.v_dim
    blocks = {}
    for kind, block in trace.blocks.items():
        routed = block.params.get("routed_expert", 0)
        dense = block.params_total - routed
        if layout.zero1:
            ag = rs = 0.0
        else:
            ag, rs = comm.fsdp_block_times(profile, dense / layout.tp, routed / layout.ep / layout.tp, layout,
                                           param_bytes, reduce_bytes)
        if layout.hsdp_replicas > 1 and not layout.zero1:  # gradients of each shard are also summed across replicas
            shard = block_unsharded_numel(block, layout.ep, layout.tp) / max(1, layout.fsdp // layout.ep)
            rs += comm.all_reduce_time(profile, shard * reduce_bytes, layout.hsdp_replicas,
                                       layout.fsdp * layout.tp, layout.ranks)
        copies = a2a = 0.0
        if copied:
            copies = fsdp2_copy_time(profile, block_unsharded_numel(block, layout.ep, layout.tp), layout,
                                     param_bytes, reduce_bytes, gathers=2)
        regather, regather_copies = expert_regather_times(profile, routed / layout.ep / layout.tp, layout,
                                                          param_bytes, tiles)
        copies += regather_copies if copied else 0.0
        if block.num_experts:
            a2a = tiled_expert_all_to_all_time(profile, rank_tokens, hidden, block.top_k, layout, act_bytes,
                                               imbalance, tiles)
        uly = comm.ulysses_time(profile, tokens, q_width, kv_width, out_width, layout, act_bytes)
        tp_comm = comm.tensor_parallel_time(
            profile, tokens, hidden, layout, act_bytes, routed_copies=block.top_k * imbalance if block.num_experts else 0.0,
            dense_mlp=not block.num_experts or block.params.get("shared_expert", 0) > 0)
        blocks[kind] = (ag, rs, copies, a2a, uly, tp_comm, regather)
    root_fsdp = root_fsdp_copies = 0.0
    if fsdp2:
        # The root FSDP unit (embedding, final norm, head) is gathered once per micro-batch and its
        # gradients reduce-scattered after the last block: nothing is left to hide either under.
        # (A vision tower's units are priced on their own: `vision_fsdp_exposed`.)
        outside = (trace.params_total - sum(b.count * b.params_total for b in trace.blocks.values())
                   - tower_params(trace)) / layout.tp
        root_ag, root_rs = comm.fsdp_block_times(profile, outside / layout.pp, 0.0, layout, param_bytes,
                                                 reduce_bytes)
        root_fsdp = root_ag + root_rs
        if copied:
            root_fsdp_copies = fsdp2_copy_time(profile, outside / layout.pp, layout, param_bytes, reduce_bytes,
                                               gathers=1)
    pp_time = comm.pipeline_p2p_time(profile, rank_tokens, hidden, layout, act_bytes)
    return blocks, (root_fsdp, root_fsdp_copies, pp_time)


def eager_attention(config, layout: Layout, profile, seq_len: int) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's `kernels.attention: eager` on one rank."""
    elements = eager_attention_elements(config, layout, seq_len)
    dtype = "fp32" if layout.precision == "fp32" else "bf16"
    fused = layout.kernels.get("elementwise", "fused") == "fused"
    return tuple(eager_attention_time(profile, elements, config.qk_head_dim, config.v_dim, dtype, backward, fused)
                 for backward in (False, True))


def rank_profile(profile, layout: Layout):
    """The profile one rank of `layout` runs on: the per-rank view (`Profile.per_rank`) when the
    layout runs the profile's ranks per device (a3: 2, one per die), else the profile itself."""
    if layout.ranks_per_device > 1 and layout.ranks_per_device == profile.device.ranks_per_device:
        return profile.per_rank()
    return profile


def estimate(trace, config, layout: Layout, profile, global_batch: int, imbalance: float | None = None,
             recompute_every_mm: int = 0, pricing: PricingContext | None = None,
             image_fraction: float = 1.0) -> Estimate:
    """Price `layout` for `config` traced at `trace` (micro-batch 1, the run's seq_len) on `profile`.

    `recompute_every_mm`: under selective recompute, also redo every n-th forward mm of a block
    (torchtitan's op-level SAC recomputes every second one: 2); 0 keeps every GEMM output.
    `pricing`: the search's PricingContext on `profile` (its op times priced once per rank work).
    `imbalance`: the busiest EP rank's routed load over the mean; None: the sourced default
    (`cost_models.routing`). Every MoE estimate notes which it priced. `image_fraction`: the share
    of samples that carry images (vision-language models; see `image_share`).
    """
    given = imbalance is not None
    imbalance = imbalance if given else default_imbalance(layout, config)
    seq = trace.seq_len
    timing = step_time(trace, config, layout, profile, global_batch, imbalance, recompute_every_mm, pricing,
                       image_fraction)
    device_profile, profile, grad_accum, time, step = (profile, timing.profile, timing.grad_accum, timing.time,
                                                       timing.step_s)
    tokens_per_s = timing.tokens_per_s_per_device
    flops_per_token = trace.flops_per_token - (1.0 - image_fraction) * vision_flops_per_token(trace)
    mfu = flops_per_token * tokens_per_s / device_profile.peak_flops("bf16")  # tokens/s per device

    memory = memory_estimate(trace, layout, profile, grad_accum, imbalance, config, timing.recompute_every_mm,
                             pricing=pricing_for(profile, pricing))
    hbm, host = float(profile.hbm_bytes()), host_capacity(profile, layout.ranks)  # the rank profile: levels count ranks
    notes = []
    if memory.allocated > hbm:
        binding = f"memory ({memory.dominant()})"
    elif memory.offloaded_to_host > host:
        binding = "host memory (offloaded bytes)"
    else:
        binding = max(time, key=time.get)
    note = imbalance_note(layout, config, imbalance, given)
    if note:
        notes.append(note)
    return Estimate(layout=layout, seq_len=seq, global_batch=global_batch, grad_accum=grad_accum, memory=memory,
                    time=time, step_time_s=step, tokens_per_s_per_device=tokens_per_s, mfu=mfu,
                    flops_per_token=flops_per_token, hbm_bytes=hbm, host_bytes=host, binding=binding, notes=notes,
                    imbalance=imbalance, node_ranks=min(layout.ranks, profile.levels[0].devices or 1))


@dataclass(frozen=True)
class StepTime:
    """The time half of an estimate: step seconds with their breakdown, on the rank `profile`."""
    step_s: float
    time: dict[str, float]
    tokens_per_s_per_device: float
    grad_accum: int
    profile: Any  # the rank's view of the hardware profile (a3: one die)
    recompute_every_mm: int = 0


def step_time(trace, config, layout: Layout, profile, global_batch: int, imbalance: float | None = None,
              recompute_every_mm: int = 0, pricing: PricingContext | None = None,
              image_fraction: float = 1.0) -> StepTime:
    """`estimate` without its memory: what a search needs to bound a layout's throughput."""
    imbalance = imbalance if imbalance is not None else default_imbalance(layout, config)
    seq = trace.seq_len
    if trace.micro_batch != 1:
        raise ValueError("estimate expects a trace taken at micro-batch 1 (costs scale linearly)")
    # Offload changes neither the micro-batch nor the pipeline: its variants share those terms.
    share = image_share(image_fraction, layout.micro_batch)
    key = (id(trace), layout_key(layout, without=("offload",)), global_batch, imbalance, recompute_every_mm, id(config),
           share)
    if pricing is None or not holds(pricing.memos.get("step", {}), key):
        # check_layout reads no offload: a layout whose terms are memoised passed it already.
        check_layout(layout, config, seq, global_batch)
    profile = rank_profile(profile, layout)  # a3: a rank is one die
    context = pricing_for(profile, pricing)
    # The memo holds the trace and config it was computed for, so their ids name no other object.
    terms = memoised(context.memos.setdefault("step", {}), key, lambda: (trace, config, _step_terms(
        trace, config, layout, profile, global_batch, imbalance, recompute_every_mm, context, share)))[2]
    grad_accum, work = terms.grad_accum, terms.work
    busiest, micro, bubble, zero1_exposed = terms.busiest, terms.micro, terms.bubble, terms.zero1_exposed
    params_on_rank = trace.params_total / (layout.tp * layout.pp * (layout.dp_world if layout.zero1 else layout.fsdp))
    optimizer = memory_time(profile, params_on_rank * OPTIMIZER_BYTES_PER_PARAM)
    if "params" in layout.offload or (layout.zero1 and "optimizer" in layout.offload):
        # The step runs on host (FSDP2's CPU offload; ZeRO-1's host shards): gradients to host and
        # updated parameters back over the host link, on top of the update itself (priced as if it
        # ran at device speed: offload never looks cheaper than none).
        optimizer += 2 * params_on_rank * 4 / profile.host_bandwidth()
    optimizer += optimizer_offload_time(params_on_rank, layout, profile)  # moments in and out
    offload_time = 0.0
    if "activations" in layout.offload:
        # The same for every offload setting that moves activations: once per step-terms key (whose
        # memo entry holds the trace and config its ids name).
        offload_time = grad_accum * memoised(context.memos.setdefault("activation_copies", {}), key, lambda: (
            activation_copy_time(trace, config, layout, terms.times, terms.tf, terms.work.recompute_every_mm,
                                 imbalance, profile.host_bandwidth(), terms.overlap)))

    step = grad_accum * micro + bubble + optimizer + offload_time + zero1_exposed
    time = {key: grad_accum * busiest[key] for key in MICRO_PARTS}
    time["fsdp_exposed"] += zero1_exposed
    time.update(pipeline_bubble=bubble, optimizer=optimizer, offload=offload_time,
                host_bound=grad_accum * busiest["host_bound"])
    return StepTime(step_s=step, time=time, tokens_per_s_per_device=global_batch * seq / step / layout.devices,
                    grad_accum=grad_accum, profile=profile, recompute_every_mm=work.recompute_every_mm)


@dataclass(frozen=True)
class _StepTerms:
    """What `estimate` prices before offload: shared by a layout's offload variants."""
    grad_accum: int
    tf: float
    work: RankWork
    times: dict
    overlap: bool
    busiest: dict
    micro: float
    bubble: float
    zero1_exposed: float


def _step_terms(trace, config, layout: Layout, profile, global_batch: int, imbalance: float,
                recompute_every_mm: int, pricing: PricingContext, vision_share: float = 1.0) -> _StepTerms:
    """The busiest pipeline rank's micro-batch, the bubble and ZeRO-1's exposed step collectives
    of `layout` on the rank `profile` (see `estimate`)."""
    seq = trace.seq_len
    tiles = check_trace_tiles(trace, layout)
    grad_accum = layout.grad_accum(global_batch)
    tf = layout.micro_batch / layout.sp  # this rank's tokens per micro-batch, in traced sequences
    param_bytes = COMPUTE_BYTES[layout.precision]
    reduce_bytes = grad_bytes(layout)
    work = rank_work(trace, layout, imbalance, recompute_every_mm, grad_accum)
    times = pricing.group_times(trace, work)

    # One layer of the model's mix of block kinds, priced per micro-batch (a pipeline rank runs
    # `PipelineRank.layers` of them; see pipeline_ranks).
    compute = recompute = fsdp_exposed = ep_time = sp_time = tp_time = fsdp_copies = 0.0
    # gloo on CPU moves data with the same cores that compute: nothing hides under compute there.
    overlap = profile.device.kind != "cpu"
    fsdp2 = not layout.zero1 and layout.fsdp > 1
    forward_total = backward_total = backward_gemm = 0.0  # one layer's block compute, by pass
    host_ops = 0.0  # ops the host issues for one layer of one micro-batch
    first_gather = 0.0
    block_comm, (root_fsdp, root_fsdp_copies, pp_time) = communication_terms(trace, config, layout, profile,
                                                                             imbalance)
    recompute_fraction = layout.recompute_fraction()
    num_layers = sum(block.count for block in trace.blocks.values())
    eager = eager_attention(config, layout, profile, seq) if layout.kernels.get("attention") == "eager" else None
    for kind, block in trace.blocks.items():
        n = block.count / num_layers
        fwd, bwd = times.get((kind, "forward"), 0.0), times.get((kind, "backward"), 0.0)
        if eager is not None:  # the traced fused attention's time, replaced by the eager kernel's
            fwd += eager[0] - times.get((kind, "attention_forward"), 0.0)
            bwd += eager[1] - times.get((kind, "attention_backward"), 0.0)
        compute += n * (fwd + bwd)
        host_ops += n * times.get((kind, "ops"), 0.0)
        forward_total += n * fwd
        backward_total += n * bwd
        backward_gemm += n * times.get((kind, "gemm_backward"), 0.0)
        if layout.recompute == "selective":
            recompute += n * times.get((kind, "selective_recompute"), 0.0)
            host_ops += n * times.get((kind, "ops_selective"), 0.0)
        else:
            recompute += n * recompute_fraction * fwd
            host_ops += n * recompute_fraction * times.get((kind, "ops_forward"), 0.0)
        ag, rs, copies, a2a, uly, tp_comm, regather = block_comm[kind]
        # A kind kept gathered (keep_gathered) is gathered once per step, in the first forward.
        kept = block_mlp_kind(block) in layout.keep_gathered
        if overlap:
            first_gather = max(first_gather, ag)
        # forward: gather overlaps the previous block; backward: re-gather + reduce-scatter.
        fsdp_exposed += n * comm.fsdp_exposed_time(ag, rs, fwd, bwd, grad_accum, kept, overlap)
        if not kept:  # a tile's gathers wait on the tile before: not prefetched (kept: gathered already)
            fsdp_exposed += n * regather
        if fsdp2 and layout.fsdp_buffers == "copy":  # zero_copy buffers: no copies
            fsdp_copies += n * (fsdp2_copy_time(profile, block_unsharded_numel(block, layout.ep, layout.tp), layout,
                                                param_bytes, reduce_bytes, gathers=1 / grad_accum) if kept else copies)
        if block.num_experts:
            redo_share = recompute_fraction if layout.recompute != "selective" else 0.0
            ep_time += n * a2a * (1 + 0.5 * (redo_share + tile_redo_share(tiles)))
        sp_time += n * uly * (1 + 0.5 * recompute_fraction)
        if layout.tp_comm == "overlapped" and overlap and layout.tp > 1:
            # Each collective is pipelined with the GEMM it feeds or follows: what the layer's
            # GEMMs cannot cover stays exposed, and the GEMMs TE overlaps by its pipeline and bulk
            # methods run on the SMs the communication leaves.
            tp_comm = max(0.0, tp_comm - times.get((kind, "gemm"), 0.0)) + comm.tp_overlap_sm_time(
                times.get((kind, "gemm_tp_margin"), 0.0))
        tp_time += n * tp_comm

    dispatch = (profile.host.dispatch_us or 0.0) * 1e-6

    kind = pipeline.schedule(layout)
    warmup = pipeline.in_flight(kind, layout.pp, layout.vpp, 0, 10**9) - 1.0 if layout.pp > 1 else 0.0
    paired = paired_share(layout.ep_overlap, grad_accum, warmup)

    vision_fsdp, vision_copies = vision_fsdp_exposed(profile, trace, layout, times, vision_share, grad_accum, overlap,
                                                     param_bytes, reduce_bytes)

    def price_rank(rank: PipelineRank) -> dict[str, float]:
        """One micro-batch on one pipeline rank: its layers plus the model's parts it holds."""
        parts = {"compute": rank.layers * compute, "recompute": rank.layers * recompute,
                 "fsdp_exposed": rank.layers * fsdp_exposed + first_gather + root_fsdp,
                 "fsdp_copies": rank.layers * fsdp_copies + root_fsdp_copies,
                 "expert_all_to_all": rank.layers * ep_time, "ulysses_all_to_all": rank.layers * sp_time,
                 "tensor_parallel": rank.layers * tp_time, "pipeline_p2p": pp_time,
                 "forward": rank.layers * forward_total, "backward": rank.layers * backward_total,
                 "backward_gemm": rank.layers * backward_gemm}
        ops = rank.layers * host_ops
        for name in rank.parts():
            share = vision_share if name in VISION_PARTS else 1.0  # the busiest rank's images
            parts["compute"] += share * (times.get((name, "forward"), 0.0) + times.get((name, "backward"), 0.0))
            ops += share * times.get((name, "ops"), 0.0)
            if name == "vision":  # the tower's own FSDP units (first rank) and recompute policy
                parts["fsdp_exposed"] += vision_fsdp
                parts["fsdp_copies"] += vision_copies
                if layout.vision_recompute != "none":
                    full = layout.vision_recompute == "full"
                    parts["recompute"] += share * times.get((name, "forward" if full else "selective_recompute"), 0.0)
                    ops += share * times.get((name, "ops_forward" if full else "ops_selective"), 0.0)
        all_to_all = parts["expert_all_to_all"]
        parts["expert_all_to_all"], parts["pipeline_p2p"] = overlap_micro(
            layout.ep_overlap, parts["compute"] + parts["recompute"], all_to_all, parts["pipeline_p2p"], paired)
        if overlap:  # the compute left after hiding all-to-alls covers the pipeline sends
            cover = parts["compute"] + parts["recompute"] - max(0.0, all_to_all - parts["expert_all_to_all"])
            parts["pipeline_p2p"] = pipeline.exposed_p2p(kind, parts["pipeline_p2p"], max(0.0, cover))
        device = sum(parts[k] for k in MICRO_PARTS)
        # Kernels run asynchronously, but no faster than the host issues them: what the host
        # takes beyond the device's micro-batch is exposed (small models; null dispatch_us: not priced).
        parts["host_bound"] = max(0.0, ops * dispatch - device)
        parts["micro"] = device + parts["host_bound"]
        return parts

    # 1F1B: the slowest rank sets the pace of every micro-batch; filling and draining the
    # pipeline passes each micro-batch slot through the other ranks once.
    ranks = [(price_rank(rank), count) for rank, count in pipeline_ranks(num_layers, layout.pp, layout.vpp)]
    busiest = max((parts for parts, _ in ranks), key=lambda parts: parts["micro"])
    micro = busiest["micro"]
    mean_micro = sum(parts["micro"] * count for parts, count in ranks) / layout.pp
    if kind == "dualpipe":
        # A pair is one micro-batch's forward and backward overlapped; W the backward's weight
        # gradients: half its GEMM time (dgrad and wgrad GEMMs have equal FLOPs).
        weight_grad = busiest["backward_gemm"] / 2
        bubble = pipeline.dualpipe_bubble(layout.pp, mean_micro, busiest["backward"], weight_grad)
    else:
        bubble = pipeline.bubble_slots(kind, layout.pp, layout.vpp) * mean_micro
    zero1_exposed = 0.0
    if layout.zero1:
        # Distributed optimizer: gradients reduce-scattered and parameters all-gathered once per
        # step over the data-parallel ranks, overlapped with the last backward / first forward.
        dense_rank, routed_rank = rank_param_split(trace, layout)
        rs = comm.reduce_scatter_time(profile, dense_rank * reduce_bytes, layout.dp_world, layout.tp, layout.ranks)
        ag = comm.all_gather_time(profile, dense_rank * param_bytes, layout.dp_world, layout.tp, layout.ranks)
        # Expert data parallelism: the tp x dp_world ranks over ep x expert_tp expert shards.
        expert_dp = max(1, layout.dp_world * layout.tp // (layout.ep * layout.expert_tp))
        expert_stride = layout.ep * layout.expert_tp
        rs += comm.reduce_scatter_time(profile, routed_rank * reduce_bytes, expert_dp, expert_stride, layout.ranks)
        ag += comm.all_gather_time(profile, routed_rank * param_bytes, expert_dp, expert_stride, layout.ranks)
        # Bucketed: reduce-scatter hides under the last micro-batch's backward, all-gather under
        # the first forward.
        zero1_exposed = max(0.0, rs - busiest["backward"]) + max(0.0, ag - busiest["forward"])

    return _StepTerms(grad_accum, tf, work, times, overlap, busiest, micro, bubble, zero1_exposed)
