"""Peak device memory of the busiest rank, from the traced graph and the layout.

Accounting (bytes per rank), FSDP2 with mixed precision:
- model states, sharded over the FSDP group (experts over EP × expert-FSDP, which is the same
  size): fp32 master parameters (4 B), fp32 gradients (4 B), AdamW moments (8 B); moved to host by
  offload ('params' moves all three, as FSDP2's CPU offload runs the optimizer on host;
  'optimizer' moves the moments).
- gathered parameters: the unsharded compute-dtype weights of the running block plus one
  prefetched block; in backward also the block's unsharded gradients and their fp32 reduce copy.
- activations: what the trace measured as saved for backward per block kind and recompute
  policy, scaled to this rank's tokens (micro_batch / sp / tp), for every layer on the rank
  (times the micro-batches in flight under pipeline parallelism); routed-expert activations of
  the busiest EP rank scaled by the routing imbalance.
- head phase: LM-head weight unsharded, the logits/loss tensors the trace measured as saved for
  the chosen loss kernel, and the larger of the loss's traced backward peak (logit gradients)
  and the head weight's gradient.
- optimizer step: master weights, gradients, moments (back from host under optimizer offload) and
  the step's temporaries (`offload.optimizer_step_bytes`).
- offload and kept-gathered blocks: `cost_models/offload.py`.
- overhead: what the caching allocator reserves beyond the allocated peak, the profile's
  `memory.fragmentation_expandable` (allocator expandable_segments) or `memory.fragmentation`
  (caching) fraction of everything else. `total` (allocated + overhead) is the reserved peak a
  framework reports (torchtitan's max_reserved); whether a layout fits is decided on the allocated
  peak (`allocated`): on a failed allocation PyTorch's caching allocator frees its cached blocks
  and retries before it reports out-of-memory (c10/cuda/CUDACachingAllocator.cpp,
  `release_cached_blocks` in `malloc`), so cached-but-free memory does not stop a run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from .compute import redone_by_selective
from .kernels import EAGER_SAVED_BYTES
from .ops import priced_ops
from .saving import SAVING_RULES, fused_saved_bytes, saving_rule  # noqa: F401  (part of this module's API)

GIB = 2**30
MASTER_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}  # fp8 training keeps bf16 weights for all-gather
HOST_FIELDS = ("offloaded_to_host", "host_activations", "host_states")
# Trace groups that run before the first layer, so the backward makes their gradients last.
LAST_IN_BACKWARD = ("embedding", "vision")


@dataclass(frozen=True)
class MemoryBreakdown:
    parameters: float
    gradients: float
    optimizer: float
    gathered_parameters: float
    activations: float
    logits_loss: float
    temporaries: float
    overhead: float
    offloaded_to_host: float = 0.0  # host bytes per rank: host_activations + host_states
    host_activations: float = 0.0  # one micro-batch's offloaded activations (offload: activations)
    host_states: float = 0.0  # offloaded model states (optimizer: moments; params: + weights, gradients)

    @property
    def total(self) -> float:
        """The reserved peak: live tensors plus what the caching allocator keeps beyond them."""
        return self.allocated + self.overhead

    @cached_property  # a search ranks thousands of breakdowns by it
    def allocated(self) -> float:
        """The allocated peak: tensors alive at the worst moment (what must fit; see `fits_memory`)."""
        return (self.parameters + self.gradients + self.optimizer + self.gathered_parameters + self.activations
                + self.logits_loss + self.temporaries)

    def parts(self) -> dict[str, float]:
        """Every field by name (`asdict` without its deep copies: the values are floats)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def gib(self) -> dict[str, float]:
        out = {k: v / GIB for k, v in self.parts().items()}
        out["allocated"] = self.allocated / GIB
        out["total"] = self.total / GIB
        return out

    def dominant(self) -> str:
        parts = {k: v for k, v in self.parts().items() if k not in HOST_FIELDS}
        return max(parts, key=parts.get)


def model_state_bytes(params_on_rank: float, offload: tuple[str, ...]) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer, offloaded) bytes for `params_on_rank` sharded parameters."""
    params, grads, optim = params_on_rank * MASTER_BYTES, params_on_rank * GRAD_BYTES, params_on_rank * ADAM_BYTES
    offloaded = 0.0
    if "params" in offload:
        offloaded, params, grads, optim = params + grads + optim, 0.0, 0.0, 0.0
    elif "optimizer" in offload:
        offloaded, optim = optim, 0.0
    return params, grads, optim, offloaded


def block_unsharded_numel(block, ep: int, tp: int) -> float:
    """Parameters one rank gathers to run one block: dense weights whole, routed experts / EP."""
    routed = block.params.get("routed_expert", 0)
    return ((block.params_total - routed) + routed / ep) / tp


def routed_saved_fraction(trace, kind: str) -> float:
    """Share of a block kind's saved activations (no recompute) that sit in routed-expert ops."""
    memo = trace.__dict__.setdefault("_routed_saved_fraction", {})
    if kind not in memo:
        memo[kind] = _routed_saved_fraction(trace, kind)
    return memo[kind]


def _routed_saved_fraction(trace, kind: str) -> float:
    total = routed = 0
    for _, d in trace.graph.nodes(data=True):
        if d.get("type") == "op" and d.get("stage") == kind and d.get("phase") == "forward":
            saved = int(d.get("saved_bytes", 0))
            total += saved
            if ".experts" in d.get("module", ""):
                routed += saved
    return routed / total if total else 0.0


def stage_layers(trace, recompute, pp: int, stage: str = "first", count: int | None = None) -> list[tuple[str, str]]:
    """(block kind, recompute policy) of each layer a pipeline stage runs: the `count` first
    (stage 'first') or last (stage 'last') layers of the model, ceil(layers / pp) when `count` is
    None. Policies follow `Layout.recompute_policies` over the whole model, as the runtime applies
    them."""
    from xplan.layout import recompute_policies

    kinds = trace.layer_kinds
    policies = recompute_policies(recompute, len(kinds))
    layers = list(zip(kinds, policies, strict=True))
    n = -(-len(kinds) // pp) if count is None else max(0, min(len(kinds), count))
    return layers[len(layers) - n:] if stage == "last" else layers[:n]


def layers_by_policy(trace, recompute, pp: int, stage: str = "first", count: int | None = None) -> dict[str, int]:
    """How many layers of a pipeline stage (see `stage_layers`) run under each recompute policy."""
    counts: dict[str, int] = {}
    for _, policy in stage_layers(trace, recompute, pp, stage, count):
        counts[policy] = counts.get(policy, 0) + 1
    return counts


def _routed_load(trace, kind: str, ep: int, imbalance: float) -> float:
    """Saved-activation multiplier of a block kind on the busiest EP rank."""
    block = trace.blocks[kind]
    if ep > 1 and imbalance > 1 and block.num_experts:
        return 1.0 + routed_saved_fraction(trace, kind) * (imbalance - 1.0)
    return 1.0


def activation_bytes(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                     in_flight: float, every_mm: int = 0, stage: str = "first", count: int | None = None,
                     rule: str = "eager", vision: str = "none") -> tuple[float, float]:
    """(saved activations on the rank, largest single-block saved bytes) in bytes, for the pipeline
    stage `stage` ('first' or 'last', `count` layers; see `stage_layers`) under saving `rule`
    (`vision`: the vision tower's recompute policy)."""
    memo = trace.__dict__.setdefault("_activation_bytes", {})
    key = (recompute, token_factor, tp, pp, ep, imbalance, in_flight, every_mm, stage, count, rule, vision)
    if key not in memo:
        memo[key] = _activation_bytes(trace, recompute, token_factor, tp, pp, ep, imbalance, in_flight, every_mm,
                                      stage, count, rule, vision)
    return memo[key]


def redone_mm_bytes(trace, kind: str, every_mm: int) -> int:
    """Output bytes (traced micro-batch) of the forward `mm`s of a block kind that a selective
    policy redoing every `every_mm`-th one (torchtitan's op-level SAC, the rule of
    `compute.redone_by_selective`) no longer keeps; the trace's own policy keeps them all."""
    if every_mm <= 0:
        return 0
    memo = trace.__dict__.setdefault("_redone_mm_bytes", {})
    if (kind, every_mm) not in memo:
        seen: dict[str, int] = {}
        memo[(kind, every_mm)] = sum(
            op.out_bytes for op in priced_ops(trace)
            if op.group == kind and op.op == "mm" and redone_by_selective(op, seen, every_mm) and op.selective_saved)
    return memo[(kind, every_mm)]


def _saved_walk(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                every_mm: int = 0, stage: str = "first", count: int | None = None, rule: str = "eager",
                vision: str = "none"):
    """(embedding saved bytes, [(kind, policy, saved bytes)] per layer of a pipeline stage), scaled
    to this rank's tokens and the busiest EP rank's routed load; selective layers drop the
    outputs of the mms redone under `every_mm` (see `redone_mm_bytes`); layers without recompute
    save as `rule` says (see `fused_saved_bytes`). Only the first stage holds the embedding, and a
    vision-language model's vision tower with it (what its layers keep under policy `vision`).
    Memoised on the trace (callers only read the result)."""
    memo = trace.__dict__.setdefault("_saved_walk", {})
    key = (recompute, token_factor, tp, pp, ep, imbalance, every_mm, stage, count, rule, vision)
    if key not in memo:
        memo[key] = _saved_walk_uncached(trace, recompute, token_factor, tp, pp, ep, imbalance, every_mm, stage,
                                         count, rule, vision)
    return memo[key]


def _saved_walk_uncached(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                         every_mm: int, stage: str, count: int | None, rule: str, vision: str):
    scale = token_factor / tp
    embedding = 0.0
    if stage == "first" or pp == 1:
        emb, tower = trace.others.get("embedding"), trace.others.get("vision")
        embedding = ((emb.saved_bytes["none"] if emb is not None else 0)
                     + (tower.saved_bytes[vision] if tower is not None else 0)) * scale
    layers = []
    for kind, policy in stage_layers(trace, recompute, pp, stage, count):
        kept = trace.blocks[kind].saved_bytes[policy]
        if policy == "none":
            kept = fused_saved_bytes(trace, kind, rule)
        if policy == "selective":
            kept -= redone_mm_bytes(trace, kind, every_mm)
        layers.append((kind, policy, kept * scale * _routed_load(trace, kind, ep, imbalance)))
    return embedding, layers


def _activation_bytes(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                      in_flight: float, every_mm: int, stage: str, count: int | None,
                      rule: str, vision: str) -> tuple[float, float]:
    embedding, layers = _saved_walk(trace, recompute, token_factor, tp, pp, ep, imbalance, every_mm, stage, count,
                                    rule, vision)
    largest = 0.0
    for kind, _, _ in layers:
        largest = max(largest, trace.blocks[kind].saved_bytes["none"] * token_factor / tp
                      * _routed_load(trace, kind, ep, imbalance))
    return (embedding + sum(saved for _, _, saved in layers)) * in_flight, largest


def fsdp_backward_buffers(block, ep: int, tp: int, compute_bytes: int, zero1: bool) -> dict[str, tuple[float, float]]:
    """(gathered parameters, other FSDP buffers) bytes during each part of a block's backward.

    One FSDP unit per block: the block and the previous one (backward prefetch) gathered, the
    block's gradients in compute dtype and the previous reduce-scatter's fp32 input still held.
    With EP the routed experts are their own unit (runtime.distributed.parallelize): in the MLP's
    backward the experts are gathered too and the later block's fp32 reduce-scatter input is
    held; in the attention's backward the experts are resharded and their fp32 reduce-scatter
    input is held instead. ZeRO-1 (fsdp = 1) gathers nothing.
    """
    routed = block.params.get("routed_expert", 0)
    dense = (block.params_total - routed) / tp
    routed = routed / ep / tp
    unit = dense + routed
    if zero1:
        return {"attention": (0.0, unit * (compute_bytes + GRAD_BYTES)),
                "mlp": (0.0, unit * (compute_bytes + GRAD_BYTES))}
    if ep > 1 and routed:
        return {"attention": (2 * dense * compute_bytes, dense * compute_bytes + routed * GRAD_BYTES),
                "mlp": ((2 * dense + routed) * compute_bytes, routed * compute_bytes + dense * GRAD_BYTES)}
    whole = (2 * unit * compute_bytes, unit * (compute_bytes + GRAD_BYTES))
    return {"attention": whole, "mlp": whole}


def grads_not_yet_made(block, policy: str, part: str, ep: int, tp: int, compute_bytes: int, zero1: bool) -> float:
    """Compute-dtype gradient bytes `fsdp_backward_buffers` counts for a whole-block unit that do
    not exist yet at that part's traced peak (the trace's `backward_grads` share; a MoE MLP's peak
    comes before its expert gradients). Expert units of their own (EP) keep the full count."""
    routed = block.params.get("routed_expert", 0)
    if zero1 or (ep > 1 and routed):
        return 0.0
    share = block.backward_grads.get(policy, {}).get(part, 1.0) if getattr(block, "backward_grads", None) else 1.0
    return (1.0 - share) * block_unsharded_numel(block, ep, tp) * compute_bytes


def backward_moment(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                    in_flight: float, compute_bytes: int = 2, zero1: bool = False, grads: float = 0.0,
                    accumulated: bool = True, ep_copy: float = 0.0, every_mm: int = 0, stage: str = "first",
                    count: int | None = None, rule: str = "eager", vision: str = "none") -> tuple[float, ...]:
    memo = trace.__dict__.setdefault("_backward_moment", {})
    key = (recompute, token_factor, tp, pp, ep, imbalance, in_flight, compute_bytes, zero1, grads, accumulated,
           ep_copy, every_mm, stage, count, rule, vision)
    if key not in memo:
        memo[key] = _backward_moment(trace, recompute, token_factor, tp, pp, ep, imbalance, in_flight,
                                     compute_bytes, zero1, grads, accumulated, ep_copy, every_mm, stage, count, rule,
                                     vision)
    return memo[key]


def _backward_moment(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                     in_flight: float, compute_bytes: int, zero1: bool, grads: float, accumulated: bool,
                     ep_copy: float, every_mm: int, stage: str = "first", count: int | None = None,
                     rule: str = "eager", vision: str = "none") -> tuple[float, ...]:
    """(activations, workspace, gathered parameters, FSDP buffers, gradients) bytes at the worst
    moment of the backward through the blocks.

    Walking the layers backwards, layer i's backward starts with the saved activations of layers
    0..i (and the embedding) still alive; each part of it (MLP, then attention) adds its traced
    `backward_peak` under the layer's policy (recomputed activations, gradients in flight,
    attention workspace) and its FSDP buffers (`fsdp_backward_buffers`); with EP an MoE layer's
    MLP part also holds the gradients' all-to-all output (`ep_copy` bytes, one routed copy of the
    tokens). Micro-batches in flight under pipeline parallelism keep their saved activations; one
    runs its backward at a time. Sharded gradients (`grads` bytes when complete) are all resident
    once accumulated; in a step's only micro-batch (`accumulated` False) they appear as the
    backward reaches each unit: the head's and the layers' after i. Under `every_mm` a selective
    layer's MLP part also holds the mm outputs its recomputation redid.
    """
    parts, rows, total_params = _backward_rows(trace, recompute, token_factor, tp, pp, ep, imbalance, in_flight,
                                               compute_bytes, zero1, every_mm, stage, count, rule, vision)
    # The moment compared is sum((saved, workspace, gathered, held, gradients)), added left to
    # right: the first three come summed per row, so each comparison is the same floating-point
    # sum as the tuple's. The first largest moment wins.
    best, best_sum = -1, 0.0
    for i, (first_three, held, adds_ep_copy, after) in enumerate(rows):
        if adds_ep_copy:
            held += ep_copy
        moment_sum = first_three + held + (grads if accumulated else grads * max(0, after) / total_params)
        if moment_sum > best_sum:
            best, best_sum = i, moment_sum
    if best < 0:
        return (0.0, 0.0, 0.0, 0.0, 0.0)
    saved, workspace, gathered = parts[best]
    _, held, adds_ep_copy, after = rows[best]
    if adds_ep_copy:
        held += ep_copy
    return saved, workspace, gathered, held, grads if accumulated else grads * max(0, after) / total_params


def _backward_rows(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                   in_flight: float, compute_bytes: int, zero1: bool, every_mm: int, stage: str = "first",
                   count: int | None = None, rule: str = "eager",
                   vision: str = "none") -> tuple[list[tuple], list[tuple], int]:
    """The parts of `_backward_moment` that do not depend on the gradients or the EP copy, per
    part of each layer's backward in walk order: (saved activations, scaled workspace, gathered
    parameters); (their sum, FSDP buffers without the EP copy, whether the EP copy adds,
    parameters whose gradients exist then); and the model's parameter count. Memoised on the
    trace."""
    memo = trace.__dict__.setdefault("_backward_rows", {})
    key = (recompute, token_factor, tp, pp, ep, imbalance, in_flight, compute_bytes, zero1, every_mm, stage, count, rule,
           vision)
    if key in memo:
        return memo[key]
    scale = token_factor / tp
    running, layers = _saved_walk(trace, recompute, token_factor, tp, pp, ep, imbalance, every_mm, stage, count,
                                  rule, vision)
    cumulative = []
    for _, _, saved in layers:
        running += saved
        cumulative.append(running)
    earlier = (in_flight - 1.0) * cumulative[-1] if cumulative else 0.0
    buffers = {kind: fsdp_backward_buffers(block, ep, tp, compute_bytes, zero1) for kind, block in trace.blocks.items()}
    total_params = max(1, trace.params_total)
    after = total_params - sum(o.params_total for o in trace.others.values() if o.kind in LAST_IN_BACKWARD)
    parts, rows = [], []
    for (kind, policy, _), saved in zip(layers, cumulative, strict=True):
        block = trace.blocks[kind]
        after -= block.params_total  # parameters whose gradients exist once layer i's backward starts
        load = _routed_load(trace, kind, ep, imbalance)
        for part, peak in block.backward_peak.get(policy, {}).items():
            gathered, held = buffers[kind][part]
            held -= grads_not_yet_made(block, policy, part, ep, tp, compute_bytes, zero1)
            if part == "mlp" and policy == "selective":
                peak += redone_mm_bytes(trace, kind, every_mm)
            adds_ep_copy = part == "mlp" and bool(block.num_experts) and ep > 1
            moment = (saved + earlier, peak * scale * load, gathered)
            parts.append(moment)
            rows.append((moment[0] + moment[1] + moment[2], held, adds_ep_copy, after))
    memo[key] = (parts, rows, total_params)
    return memo[key]


def head_phase_bytes(trace, token_factor: float, tp: int, compute_bytes: int) -> tuple[float, float]:
    """(logits/loss bytes saved for backward, LM-head phase bytes on top) as the backward starts.

    The phase bytes are the head's gathered weight plus the larger of two moments the trace tells
    apart: the loss's backward (its traced peak: the logit gradients of nll_loss and log_softmax
    beside the saved log-softmax, with the full loss two fp32 [tokens, vocab] tensors) and the
    head GEMM's backward (the weight gradient in compute dtype and its fp32 reduce copy).
    """
    scale = token_factor / tp
    logits = 0.0
    for name in ("head", "loss"):
        group = trace.others.get(name)
        if group is not None:
            logits += group.saved_bytes["none"] * scale
    head = trace.others.get("head")
    head_params = head.params_total / tp if head is not None else 0
    loss_peak = max(head.backward_peak.get("none", {}).values(), default=0) * scale if head is not None else 0.0
    return logits, head_params * compute_bytes + max(loss_peak, head_params * (compute_bytes + GRAD_BYTES))


def fused_loss_head_bytes(trace, token_factor: float, tp: int, compute_bytes: int) -> tuple[float, float]:
    """(logits bytes kept, LM-head phase bytes) under a fused cross entropy: the compute-dtype logits
    (the kernel writes their gradient in place), then the gathered head weight, its gradient and
    the gradient's fp32 reduce copy."""
    from .compute import logits_bytes

    head = trace.others.get("head")
    head_params = head.params_total / tp if head is not None else 0
    return logits_bytes(trace) * token_factor / tp, head_params * (2 * compute_bytes + GRAD_BYTES)


LOSS_CHUNK_TOKENS = 1024  # the runtime's chunked loss (runtime/train/loss.py DEFAULT_CHUNK_TOKENS)


def chunked_head_moments(head_params: float, vocab: int, hidden: int, tokens: float, compute_bytes: int,
                         head_unit: bool = True) -> tuple[dict[str, float], ...]:
    """The LM head's moments under the chunked loss, by component (bytes):

    - the loss, at the end of the forward: the gathered weight and FSDP's retained all-gather
      output (gathered parameters), the loss's weight gradient, one chunk's fp32 logits and their
      gradient, and the hidden-state gradient (the loss's);
    - the final norm's backward: the runtime's head unit holds the norm too, and FSDP2 reshards it
      after the head's backward and gathers it again for the norm's (weight and all-gather output),
      while the head's fp32 reduce-scatter input is still alive beside the hidden-state gradient.
      Only where the head is an FSDP unit of its own (`head_unit`): not under ZeRO-1, not with
      tied embeddings (the root unit holds it, never resharded), not on one fp32 rank unwrapped.
    """
    weight = head_params * compute_bytes
    hidden_grad = tokens * hidden * compute_bytes
    chunk = min(LOSS_CHUNK_TOKENS, tokens)
    loss = dict(gathered_parameters=2 * weight, logits_loss=weight + chunk * vocab * (4 + compute_bytes) + hidden_grad)
    norm = dict(gathered_parameters=2 * weight, logits_loss=hidden_grad, temporaries=head_params * GRAD_BYTES)
    return (loss, norm) if head_unit else (loss,)


def routed_copy_bytes(config, tokens: float, act_bytes: int) -> float:
    """One routed copy of `tokens` tokens (each sent to top_k experts): an EP all-to-all's output."""
    return tokens * config.top_k * config.hidden_size * act_bytes


def eager_attention_elements(config, layout, seq_len: int) -> float:
    """Score elements one rank's eager attention materialises per layer and micro-batch:
    micro-batch x its heads (over tp, and over sp under Ulysses: whole sequences) x seq x seq."""
    return layout.micro_batch / layout.sp * config.num_heads / layout.tp * seq_len * seq_len


def eager_saved_bytes(config, layout, policy_counts: dict[str, float], seq_len: int, in_flight: float) -> float:
    """What `kernels.attention: eager` keeps beyond the fused kernel the trace ran: each layer
    that keeps its activations holds its probabilities (fp32 and bf16, `EAGER_SAVED_BYTES` per
    score element) for backward; a fully recomputed layer holds them again while its backward
    runs (one layer at a time)."""
    if layout.kernels.get("attention") != "eager":
        return 0.0
    probs = eager_attention_elements(config, layout, seq_len) * EAGER_SAVED_BYTES
    kept = policy_counts.get("none", 0.0) + policy_counts.get("selective", 0.0)
    return (kept * in_flight + (1.0 if policy_counts.get("full", 0.0) else 0.0)) * probs


def parallel_saved_bytes(config, layout, policy_counts: dict[str, float], moe_layers: float, tokens: float,
                         act_bytes: int, imbalance: float = 1.0, tiled: bool = False) -> float:
    """Activations expert and sequence parallelism add to what the single-device trace measured.

    - with EP the busiest rank receives `imbalance` times the mean routed copy of the tokens;
    - selective recompute keeps communication outputs: with EP the dispatch and combine
      all-to-all outputs (2 × tokens × top_k × hidden) of every MoE layer; with Ulysses the q, k, v
      and output all-to-all outputs.
    - without recompute, Ulysses keeps the attention output twice (the kernel's saved output and
      the output projection's input after the reverse all-to-all), which share storage at sp = 1
      where the traced kernel is SDPA (`traced_output_shared`).
    `policy_counts` are layers per policy on this rank; `tokens` this rank's tokens per micro-batch.
    Token tiles (`tiled`) checkpoint the MoE per tile: a layer without recompute keeps no received copy.
    """
    selective = policy_counts.get("selective", 0.0)
    none = policy_counts.get("none", 0.0)
    extra = 0.0
    if layout.ep > 1 and config.num_experts:
        share = moe_layers / max(1.0, sum(policy_counts.values()))
        copy = routed_copy_bytes(config, tokens, act_bytes)
        extra += selective * share * 2 * copy
        # The busiest rank's received dispatch copy (made in the MoE block, outside the experts).
        extra += (selective + (0.0 if tiled else none)) * share * (imbalance - 1.0) * copy
    if layout.sp > 1:
        kv_heads = config.num_heads if config.attention_kind == "mla" else max(config.num_kv_heads, layout.sp)
        # Head-sharded over the whole sequence = this rank's tokens × all heads, per tensor.
        widths = (config.num_heads * config.qk_head_dim + kv_heads * (config.qk_head_dim + config.v_dim)
                  + config.num_heads * config.v_dim)
        extra += selective * tokens * widths * act_bytes
        if traced_output_shared(config):
            extra += none * tokens * config.num_heads * config.v_dim * act_bytes
    return extra


def traced_output_shared(config) -> bool:
    """Whether the traced attention's saved output is the storage the output projection reads
    (so Ulysses' reverse all-to-all adds a copy the trace does not have). The tracer runs on CPU,
    where `runtime.models.layers.attention_core` takes SDPA only for plain causal attention with
    equal query and value widths; otherwise blockwise attention runs, and the projection's input
    is already a copy of its output (MLA's narrower values, GPT-OSS's sinks and windows)."""
    return config.qk_head_dim == config.v_dim and config.family != "gpt_oss" and not config.sliding_window


def rank_param_split(trace, layout) -> tuple[float, float]:
    """(dense, routed-expert) parameters one rank holds unsharded by FSDP (after TP, PP and EP)."""
    routed = sum(b.count * b.params.get("routed_expert", 0) for b in trace.blocks.values())
    dense = trace.params_total - routed
    return dense / (layout.tp * layout.pp), routed / (layout.ep * layout.expert_tp * layout.pp)


def grad_bytes(layout) -> int:
    """Bytes per gradient element the data-parallel reduction uses (`Layout.grad_dtype`)."""
    return 2 if getattr(layout, "grad_dtype", "fp32") == "bf16" else 4
