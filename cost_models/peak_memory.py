"""Peak memory of one layout's busiest rank, assembled from the parts in `memory` (the accounting
is described there).

The parts offload leaves alone are computed once per layout without offload and memoised on the
trace: a search checks every offload setting of each layout, then prices some of them again.
"""

from __future__ import annotations

from dataclasses import dataclass

from xplan.layout import Layout

from .memory import (
    COMPUTE_BYTES,
    MemoryBreakdown,
    activation_bytes,
    backward_moment,
    block_unsharded_numel,
    chunked_head_bytes,
    head_phase_bytes,
    layers_by_policy,
    model_state_bytes,
    parallel_saved_bytes,
    rank_param_split,
    routed_copy_bytes,
    stage_layers,
)
from .memos import layout_key, memoised
from .tiling import check_trace_tiles


def memory_estimate(trace, layout: Layout, profile, grad_accum: int, imbalance: float = 1.0,
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
    memo = trace.__dict__.setdefault("_memory_terms", {})
    key = (layout_key(layout, without=("offload",)), grad_accum, imbalance, recompute_every_mm, id(profile),
           id(config))
    _, _, terms = memoised(memo, key, lambda: (profile, config, _offload_free_terms(
        trace, layout, profile, grad_accum, imbalance, config, recompute_every_mm)))
    return _with_offload(trace, layout, terms, grad_accum, imbalance, recompute_every_mm)


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


def _offload_free_terms(trace, layout: Layout, profile, grad_accum: int, imbalance: float, config,
                        recompute_every_mm: int) -> _OffloadFreeTerms:
    tf = layout.micro_batch / layout.sp
    tiles = check_trace_tiles(trace, layout)
    compute_bytes = COMPUTE_BYTES[layout.precision]
    resident = 0.0
    if layout.zero1:
        dense_rank, routed_rank = rank_param_split(trace, layout)
        resident = dense_rank + routed_rank
        state_numel = trace.params_total / (layout.tp * layout.pp * layout.dp_world)
    else:
        state_numel = trace.params_total / (layout.tp * layout.pp * layout.fsdp)
    in_flight = 1.0
    if layout.pp > 1:  # 1F1B: the first stage holds up to pp micro-batches (more when interleaved)
        in_flight = min(layout.pp * (1 + (layout.pp - 1) / (layout.pp * layout.vpp)), max(grad_accum, 1))
    saved, largest_block = activation_bytes(trace, layout.recompute, tf, layout.tp, layout.pp, layout.ep, imbalance,
                                            in_flight, recompute_every_mm)
    parts = trace.__dict__.setdefault("_memory_parts", {})  # pieces many layouts share
    gathered_block = memoised(parts, ("gathered_block", layout.ep, layout.tp), lambda: max(
        block_unsharded_numel(b, layout.ep, layout.tp) for b in trace.blocks.values()))
    extra = ep_copy = 0.0
    if config is not None:
        rank_tokens = tf * trace.seq_len / layout.tp
        counts, moe_layers = memoised(parts, ("stage_counts", layout.recompute, layout.pp), lambda: (
            layers_by_policy(trace, layout.recompute, layout.pp),
            sum(1 for kind, _ in stage_layers(trace, layout.recompute, layout.pp) if trace.blocks[kind].num_experts)))
        extra = parallel_saved_bytes(config, layout, counts, moe_layers, rank_tokens, compute_bytes,
                                     imbalance, tiled=tiles > 1) * in_flight
        if layout.ep > 1 and config.num_experts:  # the busiest rank's gradient all-to-all output (one tile's)
            ep_copy = routed_copy_bytes(config, rank_tokens / tiles, compute_bytes) * imbalance
    logits, head = memoised(parts, ("head_phase", tf, layout.tp, compute_bytes),
                             lambda: head_phase_bytes(trace, tf, layout.tp, compute_bytes))
    if config is not None and layout.kernels.get("loss") == "chunked":
        head_block = trace.others.get("head")
        head_params = head_block.params_total / layout.tp if head_block is not None else 0
        logits, head = 0.0, chunked_head_bytes(head_params, config.vocab_size, config.hidden_size,
                                               tf * trace.seq_len / layout.tp, compute_bytes)
    return _OffloadFreeTerms(compute_bytes=compute_bytes, state_numel=state_numel, resident=resident, tf=tf,
                             in_flight=in_flight, saved=saved, largest_block=largest_block,
                             gathered_block=gathered_block, extra=extra, ep_copy=ep_copy, logits=logits, head=head,
                             fragmentation=profile.memory.fragmentation or 0.0)


def _with_offload(trace, layout: Layout, t: _OffloadFreeTerms, grad_accum: int, imbalance: float,
                  recompute_every_mm: int) -> MemoryBreakdown:
    """The memory breakdown of `layout` from its offload-free terms and its offload setting."""
    compute_bytes = t.compute_bytes
    params, grads, optim, offloaded = model_state_bytes(t.state_numel, layout.offload)
    if layout.zero1:
        # Replicated compute-dtype weights and fp32 gradients; fp32 master copy + moments sharded.
        weights = t.resident * compute_bytes if layout.precision != "fp32" else 0.0
        params, grads = params + weights, t.resident * 4 if "params" not in layout.offload else grads
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
            layout.zero1, grads, grad_accum > 1 or layout.zero1, t.ep_copy, recompute_every_mm)
        backward_saved += t.extra
        block_phase = workspace + held
    block_moment = grads_backward + gathered + block_phase + backward_saved
    head_moment = (grads if grad_accum > 1 else 0.0) + logits + head + saved
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
