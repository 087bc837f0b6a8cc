"""How a block's activations are saved without recompute, per engine: as the trace measured them
(the runtime's eager ops) or as fused-kernel engines save them (Transformer Engine / Megatron,
torch.compile). See `fused_saved_bytes`.
"""

from __future__ import annotations

from .ops import is_norm_module

#: How a block's activations are saved without recompute: `eager` as the trace measured them
#: (every op's autograd-saved outputs), `fused` as fused-kernel engines save them, `fused_fp8`
#: the same with fp8 GEMM inputs saved as their fp8 casts (see `fused_saved_bytes`).
SAVING_RULES = ("eager", "eager_fused_norm", "fused", "fused_fp8")


def saving_rule(layout) -> str:
    """The layout's saving rule: fused elementwise kernels save as fused engines do; fp8 GEMMs
    keep their inputs' fp8 casts; a fused norm beside eager elementwise ops (`kernels.norm`)
    saves as a fused kernel, the other ops as traced."""
    if layout.kernels.get("elementwise", "fused") != "fused":
        return "eager_fused_norm" if layout.kernels.get("norm", "auto") == "fused" else "eager"
    return "fused_fp8" if layout.precision == "fp8" else "fused"


def fused_saved_bytes(trace, kind: str, rule: str) -> float:
    """Saved bytes of one `kind` block without recompute (traced micro-batch) under `rule`.

    `eager`: the trace's own figure. `fused`: elementwise (memory-bound) ops run inside fused
    kernels, which keep only what the backward cannot recompute cheaply:
    - an elementwise output that feeds a GEMM or attention kernel is kept (Transformer Engine's
      LayerNormLinear keeps `ln_out` for the weight gradient, its fc2 keeps the SwiGLU output,
      the attention keeps its rotated q, k);
    - an elementwise output consumed only by other elementwise ops (the fp32 upcast of a norm's
      input, silu(gate) before the product) is dropped and recomputed in the backward from what
      is kept (Megatron's bias_swiglu_impl saves only its input; torch.compile's min-cut
      partitioner recomputes pointwise ops). Walking forward in trace order, an op is
      recomputable when each input is kept or recomputable; a dropped op whose input is neither
      keeps that input instead (a norm keeps its bf16 input, not the fp32 copy).
    `fused_fp8`: as `fused`, and an elementwise output kept for a GEMM is kept as its fp8 cast
    (Transformer Engine saves the quantised GEMM input: half the bytes of bf16). An MoE combine keeps
    no copy of the experts' output (see `_weights_routed_outputs`).
    `eager_fused_norm`: `fused` for the ops of normalisation modules only (a fused RMSNorm kernel
    keeps its input; e.g. torchtitan's Triton fused_rmsnorm), the others as traced.
    torch.compile's partitioner may recompute more (the kept GEMM inputs too): this is an upper
    bound for it.
    """
    block = trace.blocks[kind]
    if rule == "eager":
        return float(block.saved_bytes["none"])
    memo = trace.__dict__.setdefault("_fused_saved", {})
    if (kind, rule) not in memo:
        memo[(kind, rule)] = block.saved_bytes["none"] + _fused_saved_delta(
            trace.graph, kind, rule == "fused_fp8", norms_only=rule == "eager_fused_norm")
    return memo[(kind, rule)]


def _is_kernel(d: dict) -> bool:
    return bool(d.get("attention")) or int(d.get("flops", 0)) > 0


def _weights_routed_outputs(graph, d: dict, preds: list[str]) -> bool:
    """Whether an op of an MoE block's combine (outside its experts) takes the experts' grouped-GEMM
    output: the runtime keeps that output to weight it by the routing probabilities in the
    backward; fused engines apply the probabilities inside the experts' activation instead
    (Megatron-core's experts call weighted_bias_swiglu_impl(fc1 output, permuted_probs)), whose
    input the activation keeps anyway."""
    if ".experts" in d.get("module", "") or not d.get("module", "").startswith("mlp"):
        return False
    return any(str(graph.nodes[p].get("op", "")).rstrip("_") in ("_grouped_mm", "grouped_mm", "_scaled_grouped_mm")
               for p in preds)


def _fused_saved_delta(graph, kind: str, fp8: bool, norms_only: bool = False) -> float:
    """What `fused_saved_bytes` changes in the trace's figure for block kind `kind` (bytes)."""
    def in_block(d: dict) -> bool:
        return d.get("type") == "op" and d.get("stage") == kind and d.get("phase") == "forward"

    nodes = sorted((n for n, d in graph.nodes(data=True) if in_block(d)), key=lambda n: int(n[2:]))
    available: set[str] = set()  # outputs the backward has: kept, or recomputable from kept ones
    delta = 0.0
    for node in nodes:
        d = graph.nodes[node]
        saved = int(d.get("saved_bytes", 0))
        preds = [p for p in graph.predecessors(node) if graph.nodes[p].get("type") == "op"]
        inside = [p for p in preds if in_block(graph.nodes[p])]
        if _is_kernel(d):
            if saved:
                available.add(node)
            continue
        succs = [graph.nodes[q] for q in graph.successors(node) if graph.nodes[q].get("type") == "op"]
        if norms_only and not is_norm_module(d.get("module", "")):
            if saved:  # an eager op outside the norms: kept as traced
                available.add(node)
            continue
        if saved and any(_is_kernel(q) for q in succs):  # a kernel's input: kept
            available.add(node)
            if fp8 and any(int(q.get("flops", 0)) > 0 and not q.get("attention") for q in succs):
                delta -= saved / 2
            continue
        if saved and _weights_routed_outputs(graph, d, preds):
            delta -= saved  # the routing weights move into the expert activation: nothing kept here
            available.add(node)
            continue
        if saved:  # kept only for elementwise backward: recompute it, keeping what it needs
            delta -= saved
            for p in preds:  # inputs neither kept nor recomputable (from inside or outside the block)
                if p not in available:
                    delta += int(graph.nodes[p].get("bytes_written", 0))
                    available.add(p)
            if not preds:  # a graph input
                delta += int(d.get("bytes_read", 0))
            available.add(node)
        elif preds and len(inside) == len(preds) and all(p in available for p in inside):
            available.add(node)
    return delta
