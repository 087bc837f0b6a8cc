"""Peak memory of one layout's busiest rank, assembled from the parts in `memory` (the accounting
is described there).

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
    chunked_head_bytes,
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
from .routing import default_imbalance


def memory_estimate(trace, layout: Layout, profile, grad_accum: int, imbalance: float | None = None,
                    config=None, recompute_every_mm: int = 0) -> MemoryBreakdown:
    """Peak memory of the busiest rank (see cost_models.memory for the accounting).

    The peak is the larger of two moments: the head's backward (loss and LM head live) and a
    block's backward (two blocks gathered, its gradients and recomputed activations live).
    `config` (the ModelConfig) adds what EP / Ulysses keep beyond the single-device trace;
    `recompute_every_mm` is the selective policy's every-n-th-mm rule (see `estimate`).

    What does not depend on offload (`_offload_free_terms`) is memoised on the trace per (layout
    without offload, grad_accum, imbalance, rule, profile, config): a search checks every
    offload setting of a layout, then prices some of them again. Profiles are frozen, and the
    memo holds the profile and config it was computed for, so their ids name no other object.
    """
    if layout.ranks_per_device > 1 and layout.ranks_per_device == profile.device.ranks_per_device:
        profile = profile.per_rank()  # a3: a rank is one die (estimate.rank_profile)
    if imbalance is None:  # the sourced default (cost_models.routing)
        imbalance = default_imbalance(layout, config)
    memo = trace.__dict__.setdefault("_memory_terms", {})
    best = None
    for stage in pipeline_stages(trace, layout, grad_accum):
        key = (layout_key(layout, without=("offload",)), grad_accum, imbalance, recompute_every_mm, id(profile),
               id(config), stage)
        _, _, terms = memoised(memo, key, lambda stage=stage: (profile, config, _offload_free_terms(
            trace, layout, profile, grad_accum, imbalance, config, recompute_every_mm, stage)))
        memory = _with_offload(trace, layout, terms, grad_accum, imbalance, recompute_every_mm)
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


def pipeline_stages(trace, layout: Layout, grad_accum: int) -> tuple[Stage, ...]:
    """The stages whose peaks bound the rank's: one without pipeline parallelism; else the first
    (embedding, most micro-batches in flight) and the last (LM head and loss). Under DualPipe
    every rank also holds the reverse direction's stage: rank 0 has the head as well."""
    if layout.pp == 1:
        return (Stage("first", None, 1.0, True),)
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
    fragmentation: float
    stage: Stage
    rule: str  # how layers without recompute save (memory.saving_rule)


def _offload_free_terms(trace, layout: Layout, profile, grad_accum: int, imbalance: float, config,
                        recompute_every_mm: int, stage: Stage) -> _OffloadFreeTerms:
    tf = layout.micro_batch / layout.sp
    compute_bytes = COMPUTE_BYTES[layout.precision]
    copies = pipeline.parameter_copies(pipeline.schedule(layout))  # DualPipe: two stages' parameters
    rule = saving_rule(layout)
    walk = {"stage": stage.name, "count": stage.count, "rule": rule}
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
                                     imbalance) * in_flight
        extra += eager_saved_bytes(config, layout, counts, trace.seq_len, in_flight)
        if layout.ep > 1 and config.num_experts:  # the busiest rank's gradient all-to-all output
            ep_copy = routed_copy_bytes(config, rank_tokens, compute_bytes) * imbalance
    logits, head = memoised(parts, ("head_phase", tf, layout.tp, compute_bytes),
                             lambda: head_phase_bytes(trace, tf, layout.tp, compute_bytes))
    if layout.kernels.get("loss") == "fused":
        logits, head = fused_loss_head_bytes(trace, tf, layout.tp, compute_bytes)
    if config is not None and layout.kernels.get("loss") == "chunked":
        head_block = trace.others.get("head")
        head_params = head_block.params_total / layout.tp if head_block is not None else 0
        logits, head = 0.0, chunked_head_bytes(head_params, config.vocab_size, config.hidden_size,
                                               tf * trace.seq_len / layout.tp, compute_bytes)
    return _OffloadFreeTerms(compute_bytes=compute_bytes, state_numel=state_numel, resident=resident, tf=tf,
                             in_flight=in_flight, saved=saved, largest_block=largest_block,
                             gathered_block=gathered_block, extra=extra, ep_copy=ep_copy, logits=logits, head=head,
                             fragmentation=profile.memory.fragmentation or 0.0, stage=stage, rule=rule)


def _with_offload(trace, layout: Layout, t: _OffloadFreeTerms, grad_accum: int, imbalance: float,
                  recompute_every_mm: int) -> MemoryBreakdown:
    """The memory breakdown of `layout` from its offload-free terms and its offload setting."""
    compute_bytes = t.compute_bytes
    params, grads, optim, offloaded = model_state_bytes(t.state_numel, layout.offload)
    if layout.zero1:
        # Replicated compute-dtype weights and gradients (fp32 unless grad_dtype says bf16, as
        # Megatron's grad_reduce_in_fp32 = False); fp32 master copy + moments sharded. Offload moves
        # the masters and moments to the host; the gradient buffers stay on the device.
        weights = t.resident * compute_bytes if layout.precision != "fp32" else 0.0
        params, grads = params + weights, t.resident * grad_bytes(layout)
    saved = t.saved
    if "activations" in layout.offload:
        on_device = min(saved, 2 * t.largest_block)  # the block in flight and the one being copied
        offloaded += saved - on_device
        saved = on_device
    gathered = 0.0 if layout.zero1 else 2 * t.gathered_block * compute_bytes  # running + prefetched
    if "activations" not in layout.offload:
        saved += t.extra
    logits, head = t.logits, t.head
    # Backward through the blocks: the worst layer's moment (saved activations of the layers
    # before it, its traced backward workspace) with its unsharded gradients (+ fp32 reduce copy)
    # and two blocks gathered. Head's backward: its buffers, logits and their gradients, blocks resharded;
    # no gradient exists yet in the first micro-batch.
    if "activations" in layout.offload:
        backward_saved, block_phase = saved, t.gathered_block * (compute_bytes + 4) + t.largest_block
        grads_backward = grads
    else:
        backward_saved, workspace, gathered, held, grads_backward = backward_moment(
            trace, layout.recompute, t.tf, layout.tp, layout.pp, layout.ep, imbalance, t.in_flight, compute_bytes,
            layout.zero1, grads, grad_accum > 1, t.ep_copy, recompute_every_mm, stage=t.stage.name,
            count=t.stage.count, rule=t.rule)
        backward_saved += t.extra
        block_phase = workspace + held
    block_moment = grads_backward + gathered + block_phase + backward_saved
    head_moment = (grads if grad_accum > 1 else 0.0) + logits + head + saved if t.stage.head else 0.0
    if head_moment >= block_moment:
        logits_loss, temporaries, gathered = logits, head, 0.0
        grads_now = grads if grad_accum > 1 else 0.0
    else:
        logits_loss, temporaries, grads_now = 0.0, block_phase, grads_backward
        saved = backward_saved
    grads = grads_now
    subtotal = params + grads + optim + gathered + saved + logits_loss + temporaries
    # What the caching allocator reserves beyond the allocated peak (profile memory.fragmentation).
    overhead = t.fragmentation * subtotal
    return MemoryBreakdown(parameters=params, gradients=grads, optimizer=optim, gathered_parameters=gathered,
                           activations=saved, logits_loss=logits_loss, temporaries=temporaries, overhead=overhead,
                           offloaded_to_host=offloaded)
