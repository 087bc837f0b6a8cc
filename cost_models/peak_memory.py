"""Peak memory of one layout's busiest rank, assembled from the parts in `memory` (the accounting
is described there) and, for offload and kept-gathered blocks, in `offload`.

Without pipeline parallelism there is one stage. With it, the first and the last stage peak
differently: the first holds the embedding and the most micro-batches in flight (pp under 1F1B),
the last the LM head, the loss and the fewest (1 under 1F1B); `cost_models.pipeline` says how many
each schedule keeps. Both are priced and the larger is the rank's peak.

The parts offload leaves alone are computed once per layout (and stage) without offload and
memoised on the trace: a search checks every offload setting of each layout, then prices some of
them again.
"""

from __future__ import annotations

from dataclasses import dataclass

from xplan.layout import Layout

from . import pipeline
from .memory import (
    COMPUTE_BYTES,
    MemoryBreakdown,
    activation_bytes,
    backward_moment,
    block_unsharded_numel,
    chunked_head_moments,
    eager_saved_bytes,
    fused_loss_head_bytes,
    grad_bytes,
    head_phase_bytes,
    layers_by_policy,
    model_state_bytes,
    parallel_saved_bytes,
    rank_param_split,
    routed_copy_bytes,
    saving_rule,
    stage_layers,
)
from .memos import layout_key, memoised
from .offload import (
    kept_gathered_bytes,
    offloaded_activation_bytes,
    offloaded_backward_moment,
    offloaded_layers,
    optimizer_step_bytes,
)
from .routing import default_imbalance
from .tiling import check_trace_tiles


def memory_estimate(trace, layout: Layout, profile, grad_accum: int, imbalance: float | None = None,
                    config=None, recompute_every_mm: int = 0, pricing=None) -> MemoryBreakdown:
    """Peak memory of the busiest rank (see cost_models.memory for the accounting).

    The peak is the largest of three moments: the head's backward (loss and LM head live), a
    block's backward (two blocks gathered, its gradients and recomputed activations live) and the
    optimizer step (its moments on the device, back from host under optimizer offload).
    `config` (the ModelConfig) adds what EP / Ulysses keep beyond the single-device trace;
    `recompute_every_mm` is the selective policy's every-n-th-mm rule (see `estimate`). `pricing`:
    a search's PricingContext, which keeps each breakdown it is asked for.

    What does not depend on offload (`_offload_free_terms`) is memoised on the trace per (layout
    without offload, grad_accum, imbalance, rule, profile, config): a search checks every
    offload setting of a layout, then prices some of them again. Profiles are frozen, and the
    memo holds the profile and config it was computed for, so their ids name no other object.
    """
    if layout.ranks_per_device > 1 and layout.ranks_per_device == profile.device.ranks_per_device:
        profile = profile.per_rank()  # a3: a rank is one die (estimate.rank_profile)
    if imbalance is None:  # the sourced default (cost_models.routing)
        imbalance = default_imbalance(layout, config)
    if pricing is not None:  # a search's context: each layout's breakdown once (bisection, then estimate)
        key = (id(trace), layout, grad_accum, imbalance, recompute_every_mm, id(config))
        return memoised(pricing.memos.setdefault("memory", {}), key, lambda: (trace, config, memory_estimate(
            trace, layout, profile, grad_accum, imbalance, config, recompute_every_mm)))[2]
    memo = trace.__dict__.setdefault("_memory_terms", {})
    best = None
    for stage in pipeline_stages(trace, layout, grad_accum):
        key = (layout_key(layout, without=("offload",)), grad_accum, imbalance, recompute_every_mm, id(profile),
               id(config), stage)
        _, _, terms = memoised(memo, key, lambda stage=stage: (profile, config, _offload_free_terms(
            trace, layout, profile, grad_accum, imbalance, config, recompute_every_mm, stage)))
        memory = _with_offload(trace, layout, terms, grad_accum, imbalance, recompute_every_mm, config)
        if best is None or memory.total > best.total:
            best = memory
    return best


@dataclass(frozen=True)
class Stage:
    """One pipeline stage priced for the peak: the first or last `count` layers of the model
    (None: all), `in_flight` micro-batches of their activations, the LM head's moment or not."""

    name: str
    count: int | None
    in_flight: float
    head: bool


_ONE_STAGE = (Stage("first", None, 1.0, True),)


def pipeline_stages(trace, layout: Layout, grad_accum: int) -> tuple[Stage, ...]:
    """The stages whose peaks bound the rank's: one without pipeline parallelism; else the first
    (embedding, most micro-batches in flight) and the last (LM head and loss). Under DualPipe
    every rank also holds the reverse direction's stage: rank 0 has the head as well."""
    if layout.pp == 1:
        return _ONE_STAGE
    kind = pipeline.schedule(layout)
    layers = len(trace.layer_kinds)
    return tuple(Stage(name, pipeline.stage_layer_count(layers, layout.pp, layout.vpp, name),
                       pipeline.in_flight(kind, layout.pp, layout.vpp, index, grad_accum),
                       name == "last" or kind == "dualpipe")
                 for name, index in (("first", 0), ("last", layout.pp - 1)))


@dataclass(frozen=True)
class _OffloadFreeTerms:
    """The parts of a layout's memory that offload leaves alone (bytes per rank)."""

    compute_bytes: int
    state_numel: float  # parameters whose master copy, gradients and moments this rank keeps
    resident: float  # ZeRO-1: parameters held unsharded (0 with FSDP)
    tf: float  # this rank's tokens per micro-batch, in traced sequences
    in_flight: float
    saved: float  # activations saved for backward (without what EP / Ulysses add)
    largest_block: float
    gathered_block: float
    extra: float  # what EP / Ulysses keep beyond the single-device trace
    ep_copy: float
    logits: float
    head: float
    # The LM head's moments by component, when priced apart (chunked loss): the loss's, the norm's.
    head_moments: tuple[dict[str, float], ...]
    fragmentation: float  # for the layout's allocator
    kept: float  # gathered weights of the kept-gathered blocks (keep_gathered)
    largest_other: float  # largest block not kept, in numel (0 when every kind is kept)
    stage: Stage
    rule: str  # how layers without recompute save (memory.saving_rule)


def _offload_free_terms(trace, layout: Layout, profile, grad_accum: int, imbalance: float, config,
                        recompute_every_mm: int, stage: Stage) -> _OffloadFreeTerms:
    tf = layout.micro_batch / layout.sp
    tiles = check_trace_tiles(trace, layout)
    compute_bytes = COMPUTE_BYTES[layout.precision]
    copies = pipeline.parameter_copies(pipeline.schedule(layout))  # DualPipe: two stages' parameters
    rule = saving_rule(layout)
    walk = {"stage": stage.name, "count": stage.count, "rule": rule, "vision": layout.vision_recompute}
    resident = 0.0
    if layout.zero1:
        dense_rank, routed_rank = rank_param_split(trace, layout)
        resident = (dense_rank + routed_rank) * copies
        state_numel = trace.params_total * copies / (layout.tp * layout.pp * layout.dp_world)
    else:
        state_numel = trace.params_total * copies / (layout.tp * layout.pp * layout.fsdp)
    in_flight = stage.in_flight
    saved, largest_block = activation_bytes(trace, layout.recompute, tf, layout.tp, layout.pp, layout.ep, imbalance,
                                            in_flight, recompute_every_mm, **walk)
    parts = trace.__dict__.setdefault("_memory_parts", {})  # pieces many layouts share
    gathered_block = memoised(parts, ("gathered_block", layout.ep, layout.tp), lambda: max(
        block_unsharded_numel(b, layout.ep, layout.tp) for b in trace.blocks.values()))
    extra = ep_copy = 0.0
    if config is not None:
        rank_tokens = tf * trace.seq_len / layout.tp
        counts, moe_layers = memoised(parts, ("stage_counts", layout.recompute, layout.pp, stage.name, stage.count),
                                      lambda: (layers_by_policy(trace, layout.recompute, layout.pp, stage.name,
                                                                stage.count),
                                               sum(1 for kind, _ in stage_layers(trace, layout.recompute, layout.pp,
                                                                                 stage.name, stage.count)
                                                   if trace.blocks[kind].num_experts)))
        extra = parallel_saved_bytes(config, layout, counts, moe_layers, rank_tokens, compute_bytes,
                                     imbalance, tiled=tiles > 1) * in_flight
        extra += eager_saved_bytes(config, layout, counts, trace.seq_len, in_flight)
        if layout.ep > 1 and config.num_experts:  # the busiest rank's gradient all-to-all output (one tile's)
            ep_copy = routed_copy_bytes(config, rank_tokens / tiles, compute_bytes) * imbalance
    logits, head = memoised(parts, ("head_phase", tf, layout.tp, compute_bytes),
                             lambda: head_phase_bytes(trace, tf, layout.tp, compute_bytes))
    if layout.kernels.get("loss") == "fused":
        logits, head = fused_loss_head_bytes(trace, tf, layout.tp, compute_bytes)
    head_moments: tuple[dict[str, float], ...] = ()
    if config is not None and layout.kernels.get("loss") == "chunked":
        head_block = trace.others.get("head")
        head_params = head_block.params_total / layout.tp if head_block is not None else 0
        logits, head = 0.0, 0.0
        # The runtime's FSDP unit of the final norm and LM head (runtime.distributed.parallelize).
        unwrapped = layout.ranks == 1 and layout.precision == "fp32" and not layout.offload
        head_unit = not (layout.zero1 or config.tie_word_embeddings or unwrapped)
        head_moments = chunked_head_moments(head_params, config.vocab_size, config.hidden_size,
                                            tf * trace.seq_len / layout.tp, compute_bytes, head_unit)
    kept, largest_other = (0.0, 0.0) if layout.zero1 else kept_gathered_bytes(trace, layout, compute_bytes)
    return _OffloadFreeTerms(compute_bytes=compute_bytes, state_numel=state_numel, resident=resident, tf=tf,
                             in_flight=in_flight, saved=saved, largest_block=largest_block,
                             gathered_block=gathered_block, extra=extra, ep_copy=ep_copy, logits=logits, head=head,
                             head_moments=head_moments,
                             fragmentation=fragmentation(profile, layout), kept=kept, largest_other=largest_other,
                             stage=stage, rule=rule)


def fragmentation(profile, layout: Layout) -> float:
    """The allocator's reserved-beyond-allocated fraction for the layout's allocator choice."""
    memory = profile.memory
    if layout.allocator == "expandable_segments" and memory.fragmentation_expandable is not None:
        return memory.fragmentation_expandable
    return memory.fragmentation or 0.0


def _with_offload(trace, layout: Layout, t: _OffloadFreeTerms, grad_accum: int, imbalance: float,
                  recompute_every_mm: int, config) -> MemoryBreakdown:
    """The memory breakdown of `layout` from its offload-free terms and its offload setting."""
    compute_bytes = t.compute_bytes
    params, grads, optim, host_states = model_state_bytes(t.state_numel, layout.offload)
    if layout.zero1:
        # Replicated compute-dtype weights and gradients (fp32 unless grad_dtype says bf16, as
        # Megatron's grad_reduce_in_fp32 = False); fp32 master copy + moments sharded. Offload moves
        # the masters and moments to the host; the gradient buffers stay on the device.
        weights = t.resident * compute_bytes if layout.precision != "fp32" else 0.0
        params, grads = params + weights, t.resident * grad_bytes(layout)
    logits, head = t.logits, t.head
    # Backward through the blocks: the worst layer's moment (saved activations of the layers
    # before it, its traced backward workspace) with its unsharded gradients (+ fp32 reduce copy)
    # and two blocks gathered (and the kept ones). Head's backward: its buffers, logits and their
    # gradients, blocks resharded but the kept ones; no gradient exists yet in the first micro-batch.
    accumulated = grad_accum > 1  # ZeRO-1 too: its gradient buffers appear as backward reaches them
    host_activations = 0.0
    if "activations" in layout.offload:
        embedding, layers = offloaded_layers(trace, layout, t.tf, imbalance, config, compute_bytes,
                                             recompute_every_mm)
        # The same for every layout on these layers (the memo holds them: their id names no other list).
        saved, host_activations = memoised(trace.__dict__.setdefault("_offloaded_bytes", {}), (id(layers), embedding),
                                           lambda: (layers, offloaded_activation_bytes(embedding, layers)))[1]
        saved, host_activations = saved * t.in_flight, host_activations * t.in_flight
        backward_saved, workspace, gathered, held, grads_backward = offloaded_backward_moment(
            trace, layout, embedding, layers, t.tf, imbalance, compute_bytes, grads, accumulated, t.ep_copy,
            recompute_every_mm, t.kept)
    else:
        saved = t.saved + t.extra
        backward_saved, workspace, gathered, held, grads_backward = backward_moment(
            trace, layout.recompute, t.tf, layout.tp, layout.pp, layout.ep, imbalance, t.in_flight, compute_bytes,
            layout.zero1, grads, accumulated, t.ep_copy, recompute_every_mm, stage=t.stage.name,
            count=t.stage.count, rule=t.rule, vision=layout.vision_recompute)
        backward_saved += t.extra
        if t.kept:  # every kind kept: the kept weights replace the running pair; else on top of it
            gathered = t.kept if not t.largest_other else gathered + t.kept
    moments = {
        "block": dict(gradients=grads_backward, gathered_parameters=gathered, activations=backward_saved,
                      temporaries=workspace + held),
    }
    if t.stage.head and t.head_moments:  # the LM head's moments (last pipeline stage), priced apart
        for i, part in enumerate(t.head_moments):
            moments["head" if i == 0 else f"head {i}"] = dict(
                gradients=grads if grad_accum > 1 else 0.0, gathered_parameters=t.kept + part["gathered_parameters"],
                activations=saved, logits_loss=part["logits_loss"], temporaries=part.get("temporaries", 0.0))
    elif t.stage.head:  # the LM head's backward (on the last pipeline stage)
        moments["head"] = dict(gradients=grads if grad_accum > 1 else 0.0, gathered_parameters=t.kept,
                               activations=saved, logits_loss=logits, temporaries=head)
    _, step_grads, step_moments, step_temp = optimizer_step_bytes(t.state_numel, layout)
    if step_moments:  # the optimizer step: moments resident (back from host when offloaded)
        moments["optimizer"] = dict(gradients=step_grads, temporaries=step_temp)
    resident = {name: optim for name in moments} | ({"optimizer": step_moments} if step_moments else {})
    # The first largest wins, the head before the block on a tie (as before the optimizer moment).
    name = max(moments, key=lambda k: (params + resident[k] + sum(moments[k].values()), k.startswith("head")))
    moment = {"gradients": 0.0, "gathered_parameters": 0.0, "activations": 0.0, "logits_loss": 0.0,
              "temporaries": 0.0, **moments[name]}
    optim = resident[name]
    subtotal = params + optim + sum(moment.values())
    # What the caching allocator reserves beyond the allocated peak (the allocator's fraction).
    overhead = t.fragmentation * subtotal
    return MemoryBreakdown(parameters=params, optimizer=optim, overhead=overhead, **moment,
                           offloaded_to_host=host_states + host_activations, host_activations=host_activations,
                           host_states=host_states)


def host_capacity(profile, devices: int, ranks_per_device: int = 1) -> float:
    """Host bytes one rank may fill: a node's host memory (the profile's host.memory_gib is per
    device; a node is one unit of the innermost interconnect level) shared by the ranks the layout
    puts on that node (all of them when fewer than a node)."""
    per_node = profile.levels[0].devices or 1
    return float(profile.host_memory_bytes()) * per_node / max(1, min(devices, per_node) * ranks_per_device)


def fits_memory(memory: MemoryBreakdown, hbm_bytes: float, host_bytes: float) -> bool:
    """Allocated device peak within HBM (the allocator's cached-but-free overhead is released
    before an allocation fails: see cost_models.memory) and offloaded bytes within the host memory
    each rank may use (`host_capacity`: its node's host memory over the ranks sharing it)."""
    return memory.allocated <= hbm_bytes and memory.offloaded_to_host <= host_bytes
