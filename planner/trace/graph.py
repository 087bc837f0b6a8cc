"""The graph IR: a `networkx.DiGraph` of the traced model.

Nodes (attribute `type`):
- ``layer``: one per decoder layer of the real model, ``layer.{i}``: `kind`, `index`, `template`
  (the block node it instantiates), and the per-layer numbers of its kind: `flops_forward`,
  `flops_backward`, `saved_bytes` (under the trace's recompute policy), `recompute_flops`, `params`,
  `param_bytes`.
- ``stage``: the parts outside the decoder layers, each traced once: ``embed``, ``rotary``,
  ``model`` (glue code outside any module), ``norm``, ``head`` (the LM head and the training loss,
  which the runtime computes inside the head's call).
- ``block``: one per block kind, ``block:{kind}``: the traced representative whose modules and ops
  hang below it; `count`, `tokens_per_expert`, saved bytes per policy (`saved_bytes_none`, ...).
- ``module``: ``{stage or block}/{module path}`` (e.g. ``block:moe/mlp.experts``): `cls`, `params`
  and `param_bytes` by role (directly owned parameters), and totals over the module and its
  sub-modules: `flops_forward`, `flops_backward`, `saved_bytes` (outputs of its ops kept for
  backward, no recompute; a block's own `saved_bytes_*` also count its input when kept).
- ``op``: ``op{n}`` in execution order: `op` (aten name), `phase` (forward/backward), `stage`,
  `module`, `flops` (model FLOPs), `flops_dense` (as dispatched), `bytes_read`, `bytes_written`,
  `saved_bytes` (outputs still alive after the forward, no recompute), `selective_saved` (kept by
  the selective policy), `attention`, `mask_fraction`, `out_shape`, `out_dtype`, `groups` (grouped
  GEMMs), `tile_tokens` (ops of a token tile of the feed-forward half: the tile's tokens) and
  `recompute` (a tile's forward op redone in the backward; its FLOPs are not model FLOPs).

Edges (attribute `kind`): ``data`` (producer -> consumer, between ops and along the layer chain
embed -> layer.0 -> ... -> norm -> head, rotary -> every layer), ``contains`` (stage/block
-> module -> op), ``instance_of`` (layer -> its block node). Cost models select edges by kind.
Graph attributes: model, family, seq_len, micro_batch, tokens, dtype, recompute, loss, tiles, flops_per_token,
flops_per_token_forward, params_total, params_active, tokens_per_expert (by block kind).

Every number is per instance and per micro-batch of `micro_batch` x `seq_len` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

STAGE_ORDER = ("embed", "rotary", "model", "norm", "head")


def stage_node(stage: str, block_kinds) -> str:
    return f"block:{stage}" if stage in block_kinds else stage


def build_graph(trace, ops, roles, scopes) -> nx.DiGraph:
    from xplan.runtime.recompute import RECOMPUTE_POLICIES

    blocks = trace.blocks
    g = nx.DiGraph(
        model=trace.model, family=trace.family, seq_len=trace.seq_len, micro_batch=trace.micro_batch,
        tokens=trace.tokens, dtype=trace.dtype, recompute=trace.recompute, loss=trace.loss, tiles=trace.tiles,
        flops_per_token=trace.flops_per_token, flops_per_token_forward=trace.flops_per_token_forward,
        params_total=trace.params_total, params_active=trace.params_active,
        tokens_per_expert={k: b.tokens_per_expert for k, b in blocks.items() if b.tokens_per_expert is not None},
    )
    # Stage and block (template) nodes.
    flops = {}
    for op in ops:
        if op.extra.get("recompute"):  # a tile's forward redone in backward: not model FLOPs
            continue
        key = (stage_node(op.scope.stage, blocks), op.phase)
        flops[key] = flops.get(key, 0) + op.flops
    extra = {op.scope.stage for op in ops} | {scope.stage for scope in scopes.values()}
    extra = sorted(s for s in extra - set(STAGE_ORDER) if stage_node(s, blocks) == s)  # e.g. "vision"
    for stage in (*extra, *STAGE_ORDER):
        g.add_node(stage, type="stage", flops_forward=flops.get((stage, "forward"), 0),
                   flops_backward=flops.get((stage, "backward"), 0))
    for kind, b in blocks.items():
        attrs = dict(type="block", kind=kind, count=b.count, flops_forward=b.flops_forward,
                     flops_backward=b.flops_backward, params=dict(b.params), param_bytes=dict(b.param_bytes),
                     params_active=b.params_active, tokens_per_expert=b.tokens_per_expert,
                     num_experts=b.num_experts, top_k=b.top_k)
        for p in RECOMPUTE_POLICIES:
            attrs[f"saved_bytes_{p}"] = b.saved_bytes[p]
            attrs[f"recompute_flops_{p}"] = b.recompute_flops.get(p, 0)
        g.add_node(f"block:{kind}", **attrs)

    # Module nodes with their parameters.
    module_nodes: dict[tuple[str, str], str] = {}

    def module_node(stage: str, path: str) -> str:
        owner = stage_node(stage, blocks)
        if not path:
            return owner
        key = (owner, path)
        if key not in module_nodes:
            node = f"{owner}/{path}"
            parent = module_node(stage, path.rpartition(".")[0])
            g.add_node(node, type="module", stage=stage, path=path, cls="", params={}, param_bytes={},
                       flops_forward=0, flops_backward=0, saved_bytes=0)
            g.add_edge(parent, node, kind="contains")
            module_nodes[key] = node
        return module_nodes[key]

    for module, scope in scopes.items():
        node = module_node(scope.stage, scope.path)
        if g.nodes[node].get("type") == "module":
            g.nodes[node]["cls"] = type(module).__name__
    for param, scope, role in roles.values():
        attrs = g.nodes[module_node(scope.stage, scope.path)]
        attrs.setdefault("params", {})
        attrs.setdefault("param_bytes", {})
        attrs["params"][role] = attrs["params"].get(role, 0) + param.numel()
        attrs["param_bytes"][role] = attrs["param_bytes"].get(role, 0) + param.numel() * param.element_size()

    # Op nodes and data flow.
    for op in ops:
        node = f"op{op.index}"
        owner = module_node(op.scope.stage, op.scope.path)
        g.add_node(node, type="op", op=op.op, phase=op.phase, stage=op.scope.stage, module=op.scope.path,
                   flops=op.flops, flops_dense=op.flops_dense, bytes_read=op.bytes_read,
                   bytes_written=op.bytes_written, saved_bytes=op.saved_bytes,
                   selective_saved=op.selective_saved, attention=op.attention, mask_fraction=op.mask_fraction,
                   out_shape=op.out_shape, out_dtype=op.out_dtype, **op.extra)
        g.add_edge(owner, node, kind="contains")
        path = op.scope.path if not op.extra.get("recompute") else ""
        while path:  # module totals include their sub-modules (model FLOPs: no tile recompute)
            attrs = g.nodes[module_nodes[(stage_node(op.scope.stage, blocks), path)]]
            attrs[f"flops_{op.phase}"] += op.flops
            attrs["saved_bytes"] += op.saved_bytes
            path = path.rpartition(".")[0]
        for src in op.inputs:
            g.add_edge(f"op{src}", node, kind="data")

    # One node per real layer, chained by data flow.
    policy = trace.recompute
    prev = "embed"
    for i, kind in enumerate(trace.layer_kinds):
        b = blocks[kind]
        node = f"layer.{i}"
        g.add_node(node, type="layer", kind=kind, index=i, template=f"block:{kind}",
                   flops_forward=b.flops_forward, flops_backward=b.flops_backward,
                   saved_bytes=b.saved_bytes[policy], recompute_flops=b.recompute_flops.get(policy, 0),
                   params=dict(b.params), param_bytes=dict(b.param_bytes))
        g.add_edge(node, f"block:{kind}", kind="instance_of")
        g.add_edge(prev, node, kind="data")
        g.add_edge("rotary", node, kind="data")
        prev = node
    for nxt in ("norm", "head"):
        g.add_edge(prev, nxt, kind="data")
        prev = nxt
    return g


def _scalar(value):
    if value is None:
        return None
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def graphml_ready(g: nx.DiGraph) -> nx.DiGraph:
    """A copy whose attributes GraphML can hold (dicts and lists as JSON text, None dropped)."""
    out = nx.DiGraph()
    out.graph.update({k: _scalar(v) for k, v in g.graph.items() if _scalar(v) is not None})
    for node, attrs in g.nodes(data=True):
        out.add_node(node, **{k: _scalar(v) for k, v in attrs.items() if _scalar(v) is not None})
    for u, v, attrs in g.edges(data=True):
        out.add_edge(u, v, **{k: _scalar(x) for k, x in attrs.items() if _scalar(x) is not None})
    return out


def export_graphml(g: nx.DiGraph, path: str | Path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(graphml_ready(g), path)
    return path
