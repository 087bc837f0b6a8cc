"""Priced-op view of a traced graph: each traced aten op as GEMM, grouped GEMM, attention or memory.

The trace is taken once per (model, seq_len) at micro-batch 1 on the whole sequence; every cost is
linear in the micro-batch at a fixed sequence length, so a layout's per-rank work is the traced
work scaled by `micro_batch / sp` (Ulysses splits tokens for projections and heads for attention)
with GEMM shapes rescaled along the token dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
GROUPED_OPS = {"_grouped_mm", "grouped_mm", "_scaled_grouped_mm"}


@dataclass(frozen=True)
class PricedOp:
    group: str  # block kind, or embed / head / loss / ...
    phase: str  # forward | backward
    category: str  # gemm | grouped | attention | memory
    flops: int  # model FLOPs at micro-batch 1 (attention masked)
    flops_dense: int  # as executed by the kernel
    nbytes: int  # bytes read + written
    dims: tuple[float, float, float] = (0, 0, 0)  # (token-dim, other, other) for GEMMs
    groups: int = 1  # grouped GEMM groups (experts)
    token_scaled: bool = True  # whether the first dim scales with tokens
    module: str = ""
    fused_nbytes: int = 0  # memory ops: bytes left when chains of elementwise ops run as one kernel
    op: str = ""  # aten op name (trailing underscore dropped), e.g. mm, addmm, mul
    selective_saved: bool = True  # forward ops: kept by the selective recompute policy (else redone)
    out_bytes: int = 0  # bytes the op writes (its outputs)
    # Identical calls the op stands for (a long sequence's loss chunks, traced once): flops and
    # bytes are their totals, dims and shape those of one call.
    repeat: int = 1
    # Inside the runtime's blockwise attention (score products, softmax, masks): what a fused
    # attention kernel does in its registers, as one call per pass.
    in_attention_kernel: bool = False


def is_norm_module(module: str) -> bool:
    """Whether a module path names a normalisation layer (input_layernorm, q_norm, ...)."""
    return "norm" in module.rsplit(".", 1)[-1]


def _shape(text: str) -> tuple[int, ...]:
    parts = text.split("x") if text else []
    return tuple(int(x) for x in parts) if all(x.isdigit() for x in parts) else ()


def _is_memory_op(d: dict) -> bool:
    return d.get("type") == "op" and not d.get("attention") and not int(d.get("flops", 0))


def _in_chain(d: dict, chain: tuple) -> bool:
    return _is_memory_op(d) and (d.get("stage"), d.get("phase")) == chain


def fused_memory_bytes(graph) -> dict[str, int]:
    """Bytes each memory-bound op moves when chains of them are fused into one kernel.

    Within one stage and pass, an elementwise op reads its inputs from memory only when one comes
    from outside the chain (a GEMM, attention, another stage, or a graph input) and writes its
    output only when something outside the chain consumes it or it is kept for backward; the
    rest stays in registers (fused RMSNorm, SwiGLU, RoPE, or torch.compile).
    """
    out = {}
    for node, d in graph.nodes(data=True):
        if not _is_memory_op(d):
            continue
        chain = (d.get("stage"), d.get("phase"))
        preds = [graph.nodes[p] for p in graph.predecessors(node) if graph.nodes[p].get("type") == "op"]
        succs = [graph.nodes[q] for q in graph.successors(node) if graph.nodes[q].get("type") == "op"]
        reads = not preds or any(not _in_chain(p, chain) for p in preds)
        writes = not succs or int(d.get("saved_bytes", 0)) > 0 or any(not _in_chain(q, chain) for q in succs)
        out[node] = int(d.get("bytes_read", 0)) * reads + int(d.get("bytes_written", 0)) * writes
    return out


def priced_ops(trace) -> list[PricedOp]:
    """Classify every op of `trace.graph` once (memoised on the trace object)."""
    cached = getattr(trace, "_priced_ops", None)
    if cached is not None:
        return cached
    all_tokens = trace.seq_len * trace.micro_batch
    fused = fused_memory_bytes(trace.graph)
    out: list[PricedOp] = []
    for node, d in trace.graph.nodes(data=True):
        if d.get("type") != "op":
            continue
        name, flops = d["op"].rstrip("_"), int(d.get("flops", 0))
        nbytes = int(d.get("bytes_read", 0)) + int(d.get("bytes_written", 0))
        repeat = max(1, int(d.get("repeat", 1)))
        common = dict(group=d["stage"], phase=d["phase"], flops=flops, flops_dense=int(d.get("flops_dense", flops)),
                      nbytes=nbytes, module=d.get("module", ""), op=name,
                      selective_saved=bool(d.get("selective_saved", True)), out_bytes=int(d.get("bytes_written", 0)),
                      repeat=repeat, in_attention_kernel=bool(d.get("in_attention_kernel", False)))
        shape = _shape(d.get("out_shape", ""))
        tokens = d.get("tile_tokens") or all_tokens  # an op of a token tile works on the tile's tokens
        if d.get("attention"):
            out.append(PricedOp(category="attention", **common))
        elif name in GROUPED_OPS and flops:
            groups = int(d.get("groups", 1))
            rows = float(d.get("rows_per_group", 0)) or tokens / groups
            if len(shape) == 2:  # [rows, n] output: k is the reduced dim
                n = shape[1]
                k = flops / (2 * groups * rows * n)
            else:  # [groups, a, b] weight gradient: rows are the reduced dim
                n, k = shape[-2], shape[-1]
                rows = flops / (2 * groups * n * k)
            out.append(PricedOp(category="grouped", dims=(rows, n, k), groups=groups, **common))
        elif flops and len(shape) >= 2:  # mm, addmm, bmm and in-place variants: out [.., m, n]
            batch = 1
            for size in shape[:-2]:
                batch *= size
            m, n = shape[-2], shape[-1]
            k = flops / (2 * batch * m * n * repeat)
            dims = [m, n, k]
            # Put the token dimension first; weight gradients carry tokens in the reduced dim.
            if abs(k - tokens) < 0.5 and m != tokens:
                dims = [k, m, n]
            elif abs(n - tokens) < 0.5 and m != tokens:
                dims = [n, m, k]
            out.append(PricedOp(category="gemm", dims=tuple(dims), groups=batch,
                                token_scaled=abs(dims[0] - tokens) < 0.5, **common))
        elif flops:
            out.append(PricedOp(category="gemm", dims=(tokens, 1, flops / (2 * tokens * repeat)), **common))
        else:
            out.append(PricedOp(category="memory", fused_nbytes=fused.get(node, nbytes), **common))
    try:
        trace._priced_ops = out
    except AttributeError:  # frozen trace objects: no memo
        pass
    return out
