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
- head phase: LM-head weight unsharded with its gradient, and the logits/loss tensors the trace
  measured for the chosen loss kernel.
- overhead: the profile's reserved memory (runtime context, communicator buffers) plus its
  allocator fragmentation fraction of everything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30
MASTER_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}  # fp8 training keeps bf16 weights for all-gather


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
    offloaded_to_host: float = 0.0

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.gathered_parameters + self.activations
                + self.logits_loss + self.temporaries + self.overhead)

    def gib(self) -> dict[str, float]:
        out = {k: v / GIB for k, v in asdict(self).items()}
        out["total"] = self.total / GIB
        return out

    def dominant(self) -> str:
        parts = {k: v for k, v in asdict(self).items() if k not in ("offloaded_to_host",)}
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


def layers_by_policy(count: int, recompute) -> dict[str, int]:
    """How many of `count` layers run under each trace policy for a layout's recompute setting."""
    if isinstance(recompute, float):
        full = round(count * recompute)
        return {"full": full, "none": count - full}
    return {recompute: count}


def activation_bytes(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                     in_flight: float) -> tuple[float, float]:
    """(saved activations on the rank, largest single-block saved bytes) in bytes."""
    memo = trace.__dict__.setdefault("_activation_bytes", {})
    key = (recompute, token_factor, tp, pp, ep, imbalance, in_flight)
    if key not in memo:
        memo[key] = _activation_bytes(trace, recompute, token_factor, tp, pp, ep, imbalance, in_flight)
    return memo[key]


def _activation_bytes(trace, recompute, token_factor: float, tp: int, pp: int, ep: int, imbalance: float,
                      in_flight: float) -> tuple[float, float]:
    total = largest = 0.0
    for kind, block in trace.blocks.items():
        count = -(-block.count // pp)  # worst stage
        load = 1.0
        if ep > 1 and imbalance > 1 and block.num_experts:
            load = 1.0 + routed_saved_fraction(trace, kind) * (imbalance - 1.0)
        per_layer_none = block.saved_bytes["none"] * token_factor / tp * load
        largest = max(largest, per_layer_none)
        for policy, n in layers_by_policy(count, recompute).items():
            total += n * block.saved_bytes[policy] * token_factor / tp * load
    emb = trace.others.get("embedding")
    if emb is not None:
        total += emb.saved_bytes["none"] * token_factor / tp
    return total * in_flight, largest


def head_phase_bytes(trace, token_factor: float, tp: int, compute_bytes: int) -> tuple[float, float]:
    """(logits/loss bytes at the start of backward, LM head gathered weight + gradient bytes)."""
    logits = 0.0
    for name in ("head", "loss"):
        group = trace.others.get(name)
        if group is not None:
            logits += group.saved_bytes["none"] * token_factor / tp
    head = trace.others.get("head")
    head_params = head.params_total / tp if head is not None else 0
    # Weight gathered in compute dtype, its gradient in compute dtype and the fp32 reduce copy.
    return logits, head_params * (compute_bytes + compute_bytes + GRAD_BYTES)


LOSS_CHUNK_TOKENS = 1024  # the runtime's chunked loss (runtime/train/loss.py DEFAULT_CHUNK_TOKENS)


def chunked_head_bytes(head_params: float, vocab: int, hidden: int, tokens: float, compute_bytes: int) -> float:
    """LM head under the chunked loss, at the end of the forward: the gathered weight, FSDP's
    retained all-gather output and the loss's weight gradient (3 weights), one chunk's fp32 logits
    and their gradient, and the hidden-state gradient the loss already produced."""
    chunk = min(LOSS_CHUNK_TOKENS, tokens)
    return 3 * head_params * compute_bytes + chunk * vocab * (4 + compute_bytes) + tokens * hidden * compute_bytes


def parallel_saved_bytes(config, layout, policy_counts: dict[str, float], moe_layers: float, tokens: float,
                         act_bytes: int, imbalance: float = 1.0) -> float:
    """Activations expert and sequence parallelism add to what the single-device trace measured.

    - with EP the busiest rank receives `imbalance` times the mean routed copy of the tokens;
    - selective recompute keeps communication outputs: with EP the dispatch and combine
      all-to-all outputs (2 × tokens × top_k × hidden) of every MoE layer; with Ulysses the q, k, v
      and output all-to-all outputs.
    - without recompute, Ulysses keeps the attention output twice (the kernel's saved output and
      the output projection's input after the reverse all-to-all), which share storage at sp = 1.
    `policy_counts` are layers per policy on this rank; `tokens` this rank's tokens per micro-batch.
    """
    selective = policy_counts.get("selective", 0.0)
    none = policy_counts.get("none", 0.0)
    extra = 0.0
    if layout.ep > 1 and config.num_experts:
        share = moe_layers / max(1.0, sum(policy_counts.values()))
        copy = tokens * config.top_k * config.hidden_size * act_bytes  # one routed copy of the tokens
        extra += selective * share * 2 * copy
        # The busiest rank's received dispatch copy (made in the MoE block, outside the experts).
        extra += (selective + none) * share * (imbalance - 1.0) * copy
    if layout.sp > 1:
        kv_heads = config.num_heads if config.attention_kind == "mla" else max(config.num_kv_heads, layout.sp)
        # Head-sharded over the whole sequence = this rank's tokens × all heads, per tensor.
        widths = (config.num_heads * config.qk_head_dim + kv_heads * (config.qk_head_dim + config.v_dim)
                  + config.num_heads * config.v_dim)
        extra += selective * tokens * widths * act_bytes
        extra += none * tokens * config.num_heads * config.v_dim * act_bytes
    return extra
