"""What offload and resharding change, priced as the runtime executes them.

Activation offload (`runtime/distributed/offload.py`), per decoder layer of the busiest stage:
- what moves to host: under full recompute the layer input (its only saved tensor); under
  selective recompute the layer input as well (the module outputs the policy keeps are held by
  the policy and stay); without recompute every saved tensor; the last layer moves nothing;
- device memory: the forward releases a layer's device copy when the next layer's forward is done;
  the backward brings layer i-1 back when layer i's backward starts and frees each copy when
  autograd does. So layer i's backward holds what stays of layers 0..i, all of layer i, and layer
  i-1's moved part; the head's phase holds what stays and the whole last layer;
- time: copies run on a side stream at the host link's bandwidth, one direction at a time; the
  compute stream waits for layer i's copy out at the end of layer i+1's forward and for layer
  i-1's copy back at the start of its backward (`exposed_copy_time` walks that timeline).
Under full recompute this is the engine we follow's "Async Checkpointing Swap" (XTuner V1's
release, 2025-09: recompute checkpoints swapped to host memory asynchronously), which is how its
FSDP-256 / EP-1 / full-recompute / 16 x 4096-token micro-batch Qwen3-235B run fits an H800.

Optimizer offload (moments only): 8 B per parameter in host memory between steps; each step copies
them in and out over the host link (16 B per parameter), not overlapped.

`keep_gathered`: the kept blocks' compute-dtype weights stay gathered through the step (all
layers of those kinds); each is all-gathered once per step instead of twice per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .images import tower_kept_params
from .memory import (
    ADAM_BYTES,
    COMPUTE_BYTES,
    GRAD_BYTES,
    LAST_IN_BACKWARD,
    MASTER_BYTES,
    _routed_load,
    _saved_walk,
    block_unsharded_numel,
    fsdp_backward_buffers,
    grads_not_yet_made,
    parallel_saved_bytes,
    redone_mm_bytes,
    stage_layers,
)
from .memos import memoised

# foreach AdamW's step makes one fp32 tensor per parameter (sqrt of the second moment) beside the
# states it updates in place (measured by the dry run's optimizer phase: 4 B per parameter).
OPTIMIZER_STEP_TEMP_BYTES = 4


def block_mlp_kind(block) -> str:
    """'moe' or 'dense': the `keep_gathered` name of a traced block kind."""
    return "moe" if block.num_experts else "dense"


def kept_gathered_bytes(trace, layout, compute_bytes: int) -> tuple[float, float]:
    """(bytes of the kept blocks' gathered weights on the busiest stage, largest block not kept in
    numel; 0 when every kind is kept)."""
    if not layout.keep_gathered:
        return 0.0, max(block_unsharded_numel(b, layout.ep, layout.tp) for b in trace.blocks.values())
    kept = 0.0
    gathered = {kind: block_unsharded_numel(block, layout.ep, layout.tp) * compute_bytes
                for kind, block in trace.blocks.items() if block_mlp_kind(block) in layout.keep_gathered}
    for kind, _ in stage_layers(trace, layout.recompute, layout.pp):
        if kind in gathered:
            kept += gathered[kind]
    if "vision" in layout.keep_gathered:  # the tower, on the first stage (the one priced)
        kept += tower_kept_params(trace) / layout.tp * compute_bytes
    others = [block_unsharded_numel(b, layout.ep, layout.tp) for b in trace.blocks.values()
              if block_mlp_kind(b) not in layout.keep_gathered]
    return kept, max(others, default=0.0)


@dataclass(frozen=True)
class OffloadedLayer:
    kind: str
    policy: str
    saved: float  # bytes the layer saves for backward on this rank (what EP / Ulysses add included)
    moved: float  # of which host copies (0 for the last layer)


def offloaded_layers(trace, layout, token_factor: float, imbalance: float, config, act_bytes: int,
                     every_mm: int = 0) -> tuple[float, list[OffloadedLayer]]:
    """(embedding saved bytes, every layer of the busiest stage) under activation offload."""
    key = (layout.recompute, layout.vision_recompute, token_factor, layout.tp, layout.pp, layout.ep, layout.sp,
           imbalance, every_mm, act_bytes, id(config))
    memo = trace.__dict__.setdefault("_offloaded_layers", {})
    if key not in memo:
        embedding, walk = _saved_walk(trace, layout.recompute, token_factor, layout.tp, layout.pp, layout.ep,
                                      imbalance, every_mm, vision=layout.vision_recompute)
        scale = token_factor / layout.tp
        rank_tokens = token_factor * trace.seq_len / layout.tp
        layers = []
        added: dict[tuple[str, bool], float] = {}  # what EP / Ulysses add, by (policy, MoE block)
        made: dict[tuple, OffloadedLayer] = {}  # (kind, policy, walked bytes) -> the layer (all but the last)
        for i, (kind, policy, saved) in enumerate(walk):
            walked = (kind, policy, saved)
            if walked in made and i < len(walk) - 1:
                layers.append(made[walked])
                continue
            block = trace.blocks[kind]
            if config is not None:
                moe = bool(block.num_experts)
                if (policy, moe) not in added:
                    added[(policy, moe)] = parallel_saved_bytes(config, layout, {policy: 1.0}, 1.0 if moe else 0.0,
                                                                rank_tokens, act_bytes, imbalance,
                                                                tiled=getattr(trace, "tiles", 1) > 1)
                saved += added[(policy, moe)]
            if i == len(walk) - 1:
                moved = 0.0
            elif policy == "selective":
                moved = min(saved, block.saved_bytes["full"] * scale)  # the input; kept outputs stay
            else:
                moved = saved
            layers.append(OffloadedLayer(kind, policy, saved, moved))
            made[walked] = layers[-1]
        memo[key] = (embedding, layers)
    return memo[key]


def offloaded_activation_bytes(embedding: float, layers: list[OffloadedLayer]) -> tuple[float, float]:
    """(device bytes at the end of the forward, host bytes) of one micro-batch's activations."""
    stays = sum(layer.saved - layer.moved for layer in layers[:-1])
    last = layers[-1].saved if layers else 0.0
    return embedding + stays + last, sum(layer.moved for layer in layers)


def offloaded_backward_moment(trace, layout, embedding: float, layers: list[OffloadedLayer], token_factor: float,
                              imbalance: float, compute_bytes: int, grads: float, accumulated: bool,
                              ep_copy: float, every_mm: int, kept_bytes: float) -> tuple[float, ...]:
    """(activations, workspace, gathered parameters, FSDP buffers, gradients) at the worst moment of
    the backward through the blocks with activation offload (see the module docstring); the
    counterpart of `memory.backward_moment`, whose accounting it follows otherwise. Memoised on
    the trace: the offload settings that move activations share it (optimizer offload leaves the
    backward alone)."""
    memo = trace.__dict__.setdefault("_offloaded_backward", {})
    key = (id(layers), embedding, token_factor, layout.tp, layout.ep, layout.zero1, layout.keep_gathered, imbalance,
           compute_bytes, grads, accumulated, ep_copy, every_mm, kept_bytes)
    # The memo holds `layers`, so its id names no other list.
    return memoised(memo, key, lambda: (layers, _offloaded_backward_moment(
        trace, layout, embedding, layers, token_factor, imbalance, compute_bytes, grads, accumulated, ep_copy,
        every_mm, kept_bytes)))[1]


def _offloaded_backward_moment(trace, layout, embedding: float, layers: list[OffloadedLayer], token_factor: float,
                               imbalance: float, compute_bytes: int, grads: float, accumulated: bool,
                               ep_copy: float, every_mm: int, kept_bytes: float) -> tuple[float, ...]:
    scale = token_factor / layout.tp
    buffers = {kind: fsdp_backward_buffers(block, layout.ep, layout.tp, compute_bytes, layout.zero1)
               for kind, block in trace.blocks.items()}
    total_params = max(1, trace.params_total)
    after = total_params - sum(o.params_total for o in trace.others.values() if o.kind in LAST_IN_BACKWARD)
    block_params = {kind: block.params_total for kind, block in trace.blocks.items()}
    parts_of: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # (workspace, gathered, held) by part

    def parts(kind: str, policy: str) -> list[tuple[float, float, float]]:
        """A layer's per-part terms: the same for every layer of one kind and policy."""
        if (kind, policy) not in parts_of:
            block = trace.blocks[kind]
            kept = block_mlp_kind(block) in layout.keep_gathered
            load = _routed_load(trace, kind, layout.ep, imbalance)
            out = []
            for part, peak in block.backward_peak.get(policy, {}).items():
                gathered, held = buffers[kind][part]
                held -= grads_not_yet_made(block, policy, part, layout.ep, layout.tp, compute_bytes, layout.zero1)
                gathered = kept_bytes + (0.0 if kept else gathered)
                if part == "mlp" and block.num_experts and layout.ep > 1:
                    held += ep_copy
                if part == "mlp" and policy == "selective":
                    peak += redone_mm_bytes(trace, kind, every_mm)
                out.append((peak * scale * load, gathered, held))
            parts_of[(kind, policy)] = out
        return parts_of[(kind, policy)]

    stays_before, best, best_sum = embedding, (0.0, 0.0, 0.0, 0.0, 0.0), 0.0
    prefetched = 0.0  # the previous layer's moved part, back for its backward
    of_layer = {}  # (kind, policy) -> (parameters, parts): the same for every such layer
    for layer in layers:
        kind, policy, saved = layer.kind, layer.policy, layer.saved
        known = of_layer.get((kind, policy))
        if known is None:
            known = of_layer[(kind, policy)] = (block_params[kind], parts(kind, policy))
        after -= known[0]
        grads_now = grads if accumulated else grads * max(0, after) / total_params
        activations = stays_before + saved + prefetched
        stays_before += saved - layer.moved
        prefetched = layer.moved
        for workspace, gathered, held in known[1]:
            total = activations + workspace + gathered + held + grads_now  # summed as sum(moment) would
            if total > best_sum:
                best, best_sum = (activations, workspace, gathered, held, grads_now), total
    return best


def optimizer_step_bytes(state_numel: float, layout) -> tuple[float, float, float, float]:
    """(parameters, gradients, moments, temporaries) on the device during the optimizer step: the
    moments are back on the device for it under `offload: optimizer`; FSDP2's CPU offload
    (`params`) steps on the host."""
    if "params" in layout.offload or layout.zero1:
        return 0.0, 0.0, 0.0, 0.0
    return (state_numel * MASTER_BYTES, state_numel * GRAD_BYTES, state_numel * ADAM_BYTES,
            state_numel * OPTIMIZER_STEP_TEMP_BYTES)


def optimizer_offload_time(state_numel: float, layout, profile) -> float:
    """Seconds per step the moments spend crossing the host link (in before the step, out after)."""
    if "optimizer" not in layout.offload or "params" in layout.offload:
        return 0.0
    return 2 * state_numel * ADAM_BYTES / profile.host_bandwidth()


def exposed_copy_time(layers: list[OffloadedLayer], forward: list[float], backward: list[float],
                      bandwidth: float, overlap: bool = True) -> tuple[float, float]:
    """(forward, backward) seconds per micro-batch the compute stream waits for activation copies.

    `forward[i]` / `backward[i]`: layer i's forward and backward (recompute included) compute time.
    Copies run one at a time on the side stream. Forward: layer i's copy out starts with its
    forward; layer i+1's forward end waits for it. Backward: layer i's start issues layer i-1's
    copy back; layer i-1 starts once it is done. Without `overlap` (CPU: no side stream) every
    copy is on the critical path."""
    if not overlap:
        moved = sum(layer.moved for layer in layers) / bandwidth
        return moved, moved
    copy = [layer.moved / bandwidth for layer in layers]
    now = side = 0.0
    done = None  # when the previous layer's copy out ends
    for fwd, seconds in zip(forward, copy, strict=True):
        start = now
        side = (side if side >= start else start) + seconds
        now = start + fwd
        if done is not None and done > now:
            now = done
        done = side
    forward_exposed = now - sum(forward)
    now = side = 0.0
    ready = 0.0
    for i in range(len(layers) - 1, -1, -1):
        start = now if now >= ready else ready
        if i >= 1:
            side = (side if side >= start else start) + copy[i - 1]
            ready = side
        now = start + backward[i]
    return forward_exposed, now - sum(backward)


def activation_copy_time(trace, config, layout, times: dict, token_factor: float, every_mm: int, imbalance: float,
                         bandwidth: float, overlap: bool) -> float:
    """Seconds per micro-batch the compute stream waits for activation copies (forward and
    backward, `exposed_copy_time`) under activation offload; `times`: the layout's group times."""
    _, layers = offloaded_layers(trace, layout, token_factor, imbalance, config, COMPUTE_BYTES[layout.precision],
                                 every_mm)
    passes: dict[tuple[str, str], tuple[float, float]] = {}  # (kind, policy) -> (forward, backward)
    forward, backward = [], []
    for layer in layers:
        if (layer.kind, layer.policy) not in passes:
            fwd = times.get((layer.kind, "forward"), 0.0)
            redo = {"full": fwd, "selective": times.get((layer.kind, "selective_recompute"), 0.0)}
            passes[(layer.kind, layer.policy)] = (fwd, times.get((layer.kind, "backward"), 0.0)
                                                  + redo.get(layer.policy, 0.0))
        fwd, bwd = passes[(layer.kind, layer.policy)]
        forward.append(fwd)
        backward.append(bwd)
    return sum(exposed_copy_time(layers, forward, backward, bandwidth, overlap=overlap))


__all__ = ["OPTIMIZER_STEP_TEMP_BYTES", "OffloadedLayer", "activation_copy_time", "block_mlp_kind", "exposed_copy_time",
           "kept_gathered_bytes", "offloaded_activation_bytes", "offloaded_backward_moment", "offloaded_layers",
           "optimizer_offload_time", "optimizer_step_bytes"]
