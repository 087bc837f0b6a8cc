"""What a trace produces (`ModelTrace`, `BlockSummary`) and its JSON form, without torch.

The tracer (tracer.py) needs torch; reading a cached trace and pricing it must not. The JSON
codec is strict: `trace_from_json` rebuilds a trace only from data of exactly the shape
`trace_to_json` writes (types, finite numbers, 64-bit integers, consistent block counts) and
raises `ValueError` on anything else, so a damaged cache entry is a miss, never a wrong trace.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

ROLES = ("embedding", "head", "attention", "dense", "shared_expert", "routed_expert")
LOSS_KERNELS = ("full", "chunked")
# The runtime's recompute policies (xplan.runtime.recompute.RECOMPUTE_POLICIES; a test keeps them
# equal): named here so that checking a policy needs no torch.
RECOMPUTE_POLICIES = ("none", "selective", "full")


@dataclass
class BlockSummary:
    """One block kind (or the embedding / head group), per instance and one micro-batch."""

    kind: str
    count: int
    layer_indices: tuple[int, ...] = ()
    flops_forward: int = 0
    flops_backward: int = 0
    flops_dense_forward: int = 0  # as dispatched, attention unmasked
    bytes_forward: int = 0  # bytes read + written by forward ops
    bytes_backward: int = 0
    params: dict[str, int] = field(default_factory=dict)  # numel by role
    param_bytes: dict[str, int] = field(default_factory=dict)  # bytes by role (traced dtype)
    params_active: int = 0  # numel one token uses (routed experts scaled by top_k / experts)
    saved_bytes: dict[str, int] = field(default_factory=dict)  # kept for backward, by recompute policy
    # Most bytes alive at once during one block's backward above what was alive as it began (its
    # saved activations and incoming gradient): recomputed activations, gradients in flight,
    # attention workspaces; parameter gradients excluded. By recompute policy, then by part:
    # 'attention' (its attention sub-block's backward) and 'mlp' (the rest). The head group's is
    # its worst stage's (the loss: logit gradients beside the saved log-softmax).
    backward_peak: dict[str, dict[str, int]] = field(default_factory=dict)
    # Share of the block's parameter-gradient bytes alive at each of those peaks, by policy and part
    # (a MoE block's experts get their gradients after its MLP's peak).
    backward_grads: dict[str, dict[str, float]] = field(default_factory=dict)
    recompute_flops: dict[str, int] = field(default_factory=dict)  # forward FLOPs redone in backward
    num_experts: int = 0
    top_k: int = 0
    tokens_per_expert: float | None = None  # expected (balanced) rows per expert GEMM

    @property
    def params_total(self) -> int:
        return sum(self.params.values())


@dataclass
class ModelTrace:
    model: str
    family: str
    seq_len: int
    micro_batch: int
    dtype: str
    recompute: str
    loss: str
    layer_kinds: tuple[str, ...]
    blocks: dict[str, BlockSummary]  # decoder block kinds, in order of first appearance
    others: dict[str, BlockSummary]  # 'embedding' (+ rotary), 'head' (final norm, LM head, loss), 'vision'
    # (a vision-language model's tower: encoder layers under each recompute policy, patch embedding, projector)
    graph: nx.DiGraph
    params_total: int
    params_active: int
    trace_time_s: float = 0.0
    code_version: str = ""
    tiles: int = 1  # token tiles of each block's feed-forward half (1: untiled)
    from_cache: bool = field(default=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def layers(self) -> dict[str, int]:
        return dict(Counter(self.layer_kinds))

    def _groups(self):
        yield from self.others.values()
        yield from self.blocks.values()

    @property
    def flops_forward(self) -> int:
        """Model FLOPs of one micro-batch's forward."""
        return sum(b.count * b.flops_forward for b in self._groups())

    @property
    def flops_backward(self) -> int:
        return sum(b.count * b.flops_backward for b in self._groups())

    @property
    def flops_per_token_forward(self) -> float:
        return self.flops_forward / self.tokens

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token: forward + backward, causal attention at half, no recompute."""
        return (self.flops_forward + self.flops_backward) / self.tokens

    def recompute_flops(self, policy: str | None = None) -> int:
        """Forward FLOPs redone in backward for one micro-batch when every block uses `policy`."""
        policy = policy or self.recompute
        return sum(b.count * b.recompute_flops.get(policy, 0) for b in self.blocks.values())

    def saved_bytes(self, policy: str | None = None) -> int:
        """Bytes kept alive for backward after one micro-batch's forward, whole model."""
        policy = policy or self.recompute
        return sum(b.count * b.saved_bytes[policy] for b in self._groups())

    def activation_bytes_per_token(self) -> dict[str, dict[str, float]]:
        """Per group (embedding, each block kind per layer, head) and recompute policy."""
        out = {}
        vision = [self.others["vision"]] if "vision" in self.others else []
        groups = [*vision, self.others["embedding"], *self.blocks.values(), self.others["head"]]
        for b in groups:
            out[b.kind] = {p: b.saved_bytes[p] / self.tokens for p in RECOMPUTE_POLICIES}
        return out

    def to_summary(self) -> dict:
        """The fields `xplan inspect --json` adds (see `inspect_fields`), plus trace details."""
        blocks = {}
        for b in self._groups():
            blocks[b.kind] = {
                "count": b.count,
                "flops_forward_per_token": b.flops_forward / self.tokens,
                "flops_backward_per_token": b.flops_backward / self.tokens,
                "recompute_flops_per_token": {p: v / self.tokens for p, v in b.recompute_flops.items()},
                "params": dict(b.params),
                "params_active": b.params_active,
                "tokens_per_expert": b.tokens_per_expert,
            }
        return {
            "flops_per_token": self.flops_per_token,
            "flops_per_token_forward": self.flops_per_token_forward,
            "activation_bytes_per_token": self.activation_bytes_per_token(),
            "layers": self.layers,
            "trace": {
                "seq_len": self.seq_len,
                "micro_batch": self.micro_batch,
                "dtype": self.dtype,
                "recompute": self.recompute,
                "loss": self.loss,
                "tiles": self.tiles,
                "params_total": self.params_total,
                "params_active": self.params_active,
                "blocks": blocks,
            },
        }


# --------------------------------------------------------------------------------------------------
# JSON codec

_SCALAR_FIELDS = {"model": str, "family": str, "seq_len": int, "micro_batch": int, "dtype": str, "recompute": str,
                  "loss": str, "params_total": int, "params_active": int, "trace_time_s": float,
                  "code_version": str, "tiles": int}
INT_LIMIT = 2**63  # every count and byte total of a trace fits a signed 64-bit integer


def _bad(what: str) -> ValueError:
    return ValueError(f"malformed trace entry: {what}")


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not -INT_LIMIT < value < INT_LIMIT:
        raise _bad(what)
    return value


def _number(value: Any, what: str) -> int | float:
    if type(value) is float:
        if not math.isfinite(value):
            raise _bad(what)
        return value
    return _int(value, what)


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise _bad(what)
    return value


def _dict(value: Any, what: str) -> dict:
    if type(value) is not dict:
        raise _bad(what)
    return value


def _numbers_by_name(value: Any, what: str) -> dict[str, int | float]:
    return {_str(k, what): _number(v, what) for k, v in _dict(value, what).items()}


def _plain(value: Any, what: str, depth: int = 0) -> Any:
    """A JSON value of a graph attribute: scalars, and lists / string-keyed objects of them."""
    if value is None or type(value) in (bool, str):
        return value
    if type(value) in (int, float):
        return _number(value, what)
    if depth < 4 and type(value) is list:
        return [_plain(v, what, depth + 1) for v in value]
    if depth < 4 and type(value) is dict:
        return {_str(k, what): _plain(v, what, depth + 1) for k, v in value.items()}
    raise _bad(what)


# What cost models read from an op node (cost_models/ops.py, memory.py): each must have this
# form; other attributes are free-form JSON (`_plain`).
_OP_COUNTS = ("flops", "flops_dense", "bytes_read", "bytes_written", "saved_bytes")
_SHAPE = re.compile(r"scalar|[0-9]+(x[0-9]+)*")
_OP_TEXT = ("op", "stage", "module", "out_shape", "out_dtype")


def _check_op_node(attrs: dict) -> None:
    for name in _OP_COUNTS:
        if _int(attrs.get(name), name) < 0:
            raise _bad(name)
    for name in _OP_TEXT:
        _str(attrs.get(name), name)
    if attrs.get("phase") not in ("forward", "backward"):
        raise _bad("op phase")
    if type(attrs.get("attention")) is not bool or type(attrs.get("selective_saved")) is not bool:
        raise _bad("op flags")
    if not 0 <= _number(attrs.get("mask_fraction"), "mask_fraction") <= 1:
        raise _bad("mask_fraction")
    for name in ("groups", "repeat"):
        if name in attrs and _int(attrs[name], name) < 1:
            raise _bad(name)
    if "rows_per_group" in attrs and _number(attrs["rows_per_group"], "rows_per_group") < 0:
        raise _bad("rows_per_group")
    shape = attrs["out_shape"]  # "AxB..." or "scalar"; a GEMM's dimensions divide its FLOPs
    if not _SHAPE.fullmatch(shape) or (attrs["flops"] and shape != "scalar" and not all(
            int(d) for d in shape.split("x"))):
        raise _bad("out_shape")


def _block_to_json(b: BlockSummary) -> dict:
    return dataclasses.asdict(b)


def _block_from_json(data: Any) -> BlockSummary:
    d = _dict(data, "block")
    if set(d) != {f.name for f in dataclasses.fields(BlockSummary)}:
        raise _bad("block fields")
    tokens_per_expert = d["tokens_per_expert"]
    if tokens_per_expert is not None:
        tokens_per_expert = _number(tokens_per_expert, "tokens_per_expert")
    layer_indices = d["layer_indices"]
    if type(layer_indices) is not list:
        raise _bad("layer_indices")
    return BlockSummary(
        kind=_str(d["kind"], "kind"), count=_int(d["count"], "count"),
        layer_indices=tuple(_int(i, "layer_indices") for i in layer_indices),
        **{name: _number(d[name], name) for name in ("flops_forward", "flops_backward", "flops_dense_forward",
                                                      "bytes_forward", "bytes_backward", "params_active",
                                                      "num_experts", "top_k")},
        **{name: _numbers_by_name(d[name], name) for name in ("params", "param_bytes", "saved_bytes",
                                                               "recompute_flops")},
        backward_peak={_str(p, "backward_peak"): _numbers_by_name(parts, "backward_peak")
                       for p, parts in _dict(d["backward_peak"], "backward_peak").items()},
        backward_grads={_str(p, "backward_grads"): _numbers_by_name(parts, "backward_grads")
                        for p, parts in _dict(d["backward_grads"], "backward_grads").items()},
        tokens_per_expert=tokens_per_expert,
    )


def graph_to_json(g: nx.DiGraph) -> dict:
    """Graph attributes, nodes with attributes (in insertion order) and edges with attributes."""
    return {"attrs": dict(g.graph), "nodes": [[n, d] for n, d in g.nodes(data=True)],
            "edges": [[u, v, d] for u, v, d in g.edges(data=True)]}


def graph_from_json(data: Any) -> nx.DiGraph:
    import networkx as nx

    d = _dict(data, "graph")
    if type(d.get("nodes")) is not list or type(d.get("edges")) is not list:
        raise _bad("graph nodes / edges")
    g = nx.DiGraph()
    g.graph.update(_plain(_dict(d.get("attrs"), "graph attributes"), "graph attributes"))
    nodes = []
    for item in d["nodes"]:
        if type(item) is not list or len(item) != 2:
            raise _bad("graph node")
        attrs = _plain(_dict(item[1], "node attributes"), "node attributes")
        if attrs.get("type") == "op":
            _check_op_node(attrs)
        nodes.append((_str(item[0], "node name"), attrs))
    g.add_nodes_from(nodes)
    edges = []
    for item in d["edges"]:
        if type(item) is not list or len(item) != 3:
            raise _bad("graph edge")
        u, v = _str(item[0], "edge"), _str(item[1], "edge")
        if u not in g or v not in g:
            raise _bad("edge to an unknown node")
        edges.append((u, v, _plain(_dict(item[2], "edge attributes"), "edge attributes")))
    g.add_edges_from(edges)
    return g


def trace_to_json(trace: ModelTrace) -> dict:
    out: dict[str, Any] = {name: getattr(trace, name) for name in _SCALAR_FIELDS}
    out["layer_kinds"] = list(trace.layer_kinds)
    out["blocks"] = [_block_to_json(b) for b in trace.blocks.values()]
    out["others"] = [_block_to_json(b) for b in trace.others.values()]
    out["graph"] = graph_to_json(trace.graph)
    return out


def trace_from_json(data: Any) -> ModelTrace:
    """The trace `trace_to_json` wrote; ValueError (or TypeError / KeyError) on anything else."""
    d = _dict(data, "trace")
    scalars = {}
    for name, kind in _SCALAR_FIELDS.items():
        value = d[name]
        scalars[name] = _str(value, name) if kind is str else (_number(value, name) if kind is float
                                                               else _int(value, name))
    if type(d["layer_kinds"]) is not list or type(d["blocks"]) is not list or type(d["others"]) is not list:
        raise _bad("layer kinds / blocks")
    layer_kinds = tuple(_str(k, "layer kind") for k in d["layer_kinds"])
    blocks = {b.kind: b for b in map(_block_from_json, d["blocks"])}
    others = {b.kind: b for b in map(_block_from_json, d["others"])}
    # What every cost model reads must be there and agree with itself.
    if (scalars["seq_len"] < 1 or scalars["micro_batch"] < 1 or not layer_kinds
            or set(layer_kinds) != set(blocks) or {"embedding", "head"} - set(others)
            or any(b.count != layer_kinds.count(kind) for kind, b in blocks.items())
            or any(set(RECOMPUTE_POLICIES) - set(b.saved_bytes) for b in (*blocks.values(), *others.values()))):
        raise _bad("inconsistent blocks")
    return ModelTrace(**scalars, layer_kinds=layer_kinds, blocks=blocks, others=others,
                      graph=graph_from_json(d["graph"]))


def same_trace(a: ModelTrace, b: ModelTrace) -> bool:
    """Whether two traces hold equal data (the graph by nodes, edges and every attribute)."""
    if any(getattr(a, name) != getattr(b, name) for name in (*_SCALAR_FIELDS, "layer_kinds", "blocks", "others")):
        return False
    if list(a.blocks) != list(b.blocks) or list(a.others) != list(b.others):
        return False
    ga, gb = a.graph, b.graph
    return (ga.graph == gb.graph and list(ga.nodes(data=True)) == list(gb.nodes(data=True))
            and list(ga.edges(data=True)) == list(gb.edges(data=True)))
