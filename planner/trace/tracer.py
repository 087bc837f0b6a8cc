"""Trace the runtime's own model on fake tensors into a `ModelTrace` (graph IR + summaries).

How one trace runs (no memory, no compute):
1. Build a *skeleton* of the runtime's `CausalLM`: the embedding, rotary table, final norm and head
   of the real model, and one `DecoderLayer` per block kind (the first layer of that kind), built on
   meta and moved to `FakeTensorMode` CPU tensors. Layers of one kind are structurally identical
   (`DecoderLayer.block_kind`), so a 61-layer model costs two block traces, not 61.
2. Run the runtime's training loss (`xplan.runtime.train.loss.token_loss_sum`, which calls the
   skeleton's own `forward` with the loss inside the LM head: 'full' logits or 'chunked'), then
   `backward`, under `OpRecorder` (a dispatch mode): every aten op with its module, FLOPs, bytes and
   producers. Storages still alive after the forward are what autograd keeps for backward (the
   saved activations).
3. Run the step twice more with `xplan.runtime.recompute.apply_recompute` putting the
   'selective' and 'full' policies on every block, to measure what each policy keeps. Every
   pass also records each block's backward peak (`BlockSummary.backward_peak`: recomputed
   activations, gradients in flight and workspaces above what the block's backward starts with).
4. Multiply per-kind numbers by the number of layers of that kind.

MoE routing is data dependent; the runtime's dropless MoE has static shapes, so the trace is exact
for FLOPs and memory whatever the routing. The expected load, tokens x top-k / experts, is
recorded per MoE block kind (`tokens_per_expert`) for cost models to apply imbalance to.

FLOP conventions: 2 FLOPs per multiply-add; matmuls, grouped matmuls and attention only; causal
attention counts half the (query, key) pairs and a sliding window counts s*w - w^2/2 of s^2 (see
`flops.attention_fraction`); `flops_per_token` is forward + backward without recompute. With the
'chunked' loss the LM head's gradient matmuls run inside the forward (the runtime's kernel computes
them there), so `flops_per_token_forward` includes them; with 'full' it is the model forward.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from torch import nn

from xplan.runtime import recompute as rc

from . import cache as trace_cache
from .recorder import OpRecorder, Scope, ScopeTracker, StageInfo

ROLES = ("embedding", "head", "attention", "dense", "shared_expert", "routed_expert")
NON_BLOCK_GROUPS = {"embed": "embedding", "rotary": "embedding", "model": "embedding", "norm": "head",
                    "head": "head"}
LOSS_KERNELS = ("full", "chunked")
_STAGE_OF_CHILD = {"embed_tokens": "embed", "rotary_emb": "rotary", "norm": "norm", "lm_head": "head"}


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
    others: dict[str, BlockSummary]  # 'embedding' (+ rotary), 'head' (final norm, LM head, loss)
    graph: nx.DiGraph
    params_total: int
    params_active: int
    trace_time_s: float = 0.0
    code_version: str = ""
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
        groups = [self.others["embedding"], *self.blocks.values(), self.others["head"]]
        for b in groups:
            out[b.kind] = {p: b.saved_bytes[p] / self.tokens for p in rc.RECOMPUTE_POLICIES}
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
                "params_total": self.params_total,
                "params_active": self.params_active,
                "blocks": blocks,
            },
        }


# --------------------------------------------------------------------------------------------------
# Skeleton


def _block_kinds(config) -> list[str]:
    from xplan.runtime.models.transformer import DecoderLayer

    return [DecoderLayer.block_kind(config, i) for i in range(config.num_layers)]


def build_skeleton(config, dtype: torch.dtype, fake_mode) -> tuple[nn.Module, list[str], list[int]]:
    """The runtime's CausalLM with one decoder layer per block kind, on fake CPU tensors."""
    from xplan.runtime.models.transformer import CausalLM, DecoderLayer

    kinds = _block_kinds(config)
    reps: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        reps.setdefault(kind, i)
    with torch.device("meta"):
        model = CausalLM(dataclasses.replace(config, num_layers=0))
        model.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in reps.values())
        model.to(dtype)
    for layer, kind in zip(model.model.layers, reps, strict=True):
        if layer.kind != kind:
            raise RuntimeError(f"layer {layer.layer_index} reports kind {layer.kind!r}, expected {kind!r}")
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    with fake_mode:
        model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu"))
    for names in tied.values():  # `_apply` gives every owner its own copy: restore shared weights
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    return model, list(reps), list(reps.values())


def _module_scopes(model: nn.Module, rep_kinds: list[str]) -> dict[nn.Module, Scope]:
    scopes: dict[nn.Module, Scope] = {}
    for name, module in model.named_modules():
        parts = name.split(".") if name else []
        if len(parts) >= 3 and parts[0] == "model" and parts[1] == "layers":
            scopes[module] = Scope(rep_kinds[int(parts[2])], ".".join(parts[3:]))
        elif len(parts) >= 2 and parts[0] == "model" and parts[1] != "layers":
            scopes[module] = Scope(_STAGE_OF_CHILD.get(parts[1], parts[1]), ".".join(parts[2:]))
        elif len(parts) >= 1 and parts[0] != "model":
            scopes[module] = Scope(_STAGE_OF_CHILD.get(parts[0], parts[0]), ".".join(parts[1:]))
    return scopes


def _param_roles(model: nn.Module, scopes: dict[nn.Module, Scope]) -> dict[int, tuple[nn.Parameter, Scope, str]]:
    """id(param) -> (param, scope, role). Roles: embedding, head, attention, dense, shared_expert,
    routed_expert (routers and norms are 'dense')."""
    from xplan.runtime.models.moe import MoE

    special: dict[nn.Module, str] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            special[module] = "embedding"
        if isinstance(module, MoE):
            for sub in module.experts.modules():
                special[sub] = "routed_expert"
            if hasattr(module, "shared_experts"):
                for sub in module.shared_experts.modules():
                    special[sub] = "shared_expert"
    out: dict[int, tuple] = {}
    for module, scope in scopes.items():
        for param in module.parameters(recurse=False):
            if id(param) in out:  # tied weights: the first owner (the embedding) keeps it
                continue
            role = special.get(module)
            if role is None:
                if scope.stage == "head":
                    role = "head"
                elif scope.path == "self_attn" or scope.path.startswith("self_attn."):
                    role = "attention"
                else:
                    role = "dense"
            out[id(param)] = (param, scope, role)
    return out


def training_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """The runtime's training loss (sum of token losses, computed inside the LM head's call)."""
    from xplan.runtime.train.loss import token_loss_sum

    return token_loss_sum(model, input_ids, labels, kind=kind)


# --------------------------------------------------------------------------------------------------
# Trace


def _run(model, scopes, stage_inputs, param_scopes, stages, micro_batch, seq_len, loss_kind, detailed, backward,
         fake):
    """One traced training step. Returns (recorder, storages alive after the forward, backward
    peak bytes per stage; {} without `backward`)."""
    tracker = ScopeTracker(scopes, stage_inputs, param_scopes).install()
    rec = OpRecorder(tracker, stages, seq_len, detailed=detailed, timeline=backward)
    peaks: dict[str, dict[str, int]] = {}
    try:
        with fake, rec:
            # Inputs are made under the recorder: the embedding keeps the token ids and the loss
            # its labels for backward, as in training.
            ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            tracker.push(Scope("head"))
            labels = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            tracker.pop()
            loss = training_loss(model, ids, labels, loss_kind)
            del ids, labels
            alive = rec.alive()
            if backward:
                loss.backward()
            del loss
        if backward:
            grads = {p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None}
            peaks = rec.backward_peaks(exclude=grads)
    finally:
        tracker.remove()
    for p in model.parameters():
        p.grad = None
    return rec, alive, peaks


def _trace(config, seq_len: int, micro_batch: int, recompute: str, dtype: torch.dtype, loss: str) -> ModelTrace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .graph import build_graph

    start = time.perf_counter()
    fake = FakeTensorMode()
    model, rep_kinds, rep_indices = build_skeleton(config, dtype, fake)
    layers = list(model.model.layers)
    scopes = _module_scopes(model, rep_kinds)
    stage_inputs = {*layers, model.model.norm, model.lm_head}
    roles = _param_roles(model, scopes)
    param_scopes = {pid: scope for pid, (_, scope, _) in roles.items()}
    stages = {}
    for kind, idx in zip(rep_kinds, rep_indices, strict=True):
        sliding = config.layer_attention_type(idx) == "sliding_attention"
        stages[kind] = StageInfo(kind, attention_window=config.sliding_window if sliding else None)
    with torch.enable_grad():
        rec, alive, peaks = _run(model, scopes, stage_inputs, param_scopes, stages, micro_batch, seq_len, loss,
                                 detailed=True, backward=True, fake=fake)
        saved = {"none": _saved_by_stage(alive)}
        backward_peaks = {"none": peaks}
        for nbytes, op_index, _ in alive:
            rec.ops[op_index].saved_bytes += nbytes
        for policy in rc.RECOMPUTE_POLICIES:
            if policy == "none":
                continue
            for layer in layers:
                rc.apply_recompute(layer, policy)
            try:
                _, alive_p, peaks_p = _run(model, scopes, stage_inputs, param_scopes, stages, micro_batch, seq_len,
                                           loss, detailed=False, backward=True, fake=fake)
            finally:
                for layer in layers:
                    rc.apply_recompute(layer, "none")
            saved[policy] = _saved_by_stage(alive_p)
            backward_peaks[policy] = peaks_p

    tokens = seq_len * micro_batch
    kinds = _block_kinds(config)
    counts = Counter(kinds)
    indices: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        indices.setdefault(k, []).append(i)

    def summary(name: str, stage_names: set[str], count: int) -> BlockSummary:
        b = BlockSummary(kind=name, count=count, layer_indices=tuple(indices.get(name, ())))
        for op in rec.ops:
            if op.scope.stage not in stage_names:
                continue
            if op.phase == "forward":
                b.flops_forward += op.flops
                b.flops_dense_forward += op.flops_dense
                b.bytes_forward += op.bytes_read + op.bytes_written
            else:
                b.flops_backward += op.flops
                b.bytes_backward += op.bytes_read + op.bytes_written
        b.recompute_flops = {"none": 0}
        if name in counts:
            b.recompute_flops["full"] = b.flops_forward
            b.recompute_flops["selective"] = sum(
                op.flops for op in rec.ops
                if op.scope.stage in stage_names and op.phase == "forward" and not op.selective_saved
            )
        else:
            b.recompute_flops.update(selective=0, full=0)
        b.params = {r: 0 for r in ROLES}
        b.param_bytes = {r: 0 for r in ROLES}
        active = 0.0
        moe = _moe_module(layers[rep_kinds.index(name)]) if name in counts else None
        for param, scope, role in roles.values():
            if scope.stage in stage_names:
                b.params[role] += param.numel()
                b.param_bytes[role] += param.numel() * param.element_size()
                share = moe.top_k / moe.num_experts if (moe is not None and role == "routed_expert") else 1.0
                active += param.numel() * share
        b.params = {r: v for r, v in b.params.items() if v}
        b.param_bytes = {r: v for r, v in b.param_bytes.items() if v}
        b.params_active = round(active)
        if moe is not None:
            b.num_experts, b.top_k = moe.num_experts, moe.top_k
            b.tokens_per_expert = tokens * moe.top_k / moe.num_experts
        b.saved_bytes = {p: sum(v for s, v in by_stage.items() if s in stage_names) for p, by_stage in saved.items()}
        if name in counts:
            b.backward_peak = {p: dict(by_stage.get(name, {})) for p, by_stage in backward_peaks.items()}
        else:  # head / embedding: their stages' backwards run one after another, so the worst one
            b.backward_peak = {p: _worst_stage_peak(by_stage, stage_names) for p, by_stage in backward_peaks.items()}
        return b

    blocks = {k: summary(k, {k}, counts[k]) for k in rep_kinds}
    others = {}
    stages_seen = {op.scope.stage for op in rec.ops} | {scope.stage for scope in scopes.values()}
    for group in ("embedding", "head"):
        members = {s for s in stages_seen | set(NON_BLOCK_GROUPS) if s not in blocks and group_of(s) == group}
        others[group] = summary(group, members, 1)
    params_total = sum(b.count * b.params_total for b in (*blocks.values(), *others.values()))
    params_active = sum(b.count * b.params_active for b in (*blocks.values(), *others.values()))
    trace = ModelTrace(
        model=config.name, family=config.family, seq_len=seq_len, micro_batch=micro_batch,
        dtype=str(dtype).removeprefix("torch."), recompute=recompute, loss=loss, layer_kinds=tuple(kinds),
        blocks=blocks, others=others, graph=nx.DiGraph(), params_total=params_total,
        params_active=params_active, code_version=trace_cache.code_version(),
    )
    trace.graph = build_graph(trace, rec.ops, roles, scopes)
    trace.trace_time_s = time.perf_counter() - start
    return trace


def _worst_stage_peak(by_stage: dict[str, dict[str, int]], stage_names: set[str]) -> dict[str, int]:
    """Per part, the largest backward peak among `stage_names` (e.g. the loss's logit gradients)."""
    out: dict[str, int] = {}
    for stage in stage_names:
        for part, peak in by_stage.get(stage, {}).items():
            out[part] = max(out.get(part, 0), peak)
    return out


def group_of(stage: str) -> str:
    """The summary group of a non-block stage (stages the runtime may add later join 'embedding')."""
    return NON_BLOCK_GROUPS.get(stage, "embedding")


def _saved_by_stage(alive) -> dict[str, int]:
    out: Counter = Counter()
    for nbytes, _, stage in alive:
        out[stage] += nbytes
    return dict(out)


def _moe_module(layer: nn.Module):
    from xplan.runtime.models.moe import MoE

    for module in layer.modules():
        if isinstance(module, MoE):
            return module
    return None


def trace_model(config, seq_len: int, micro_batch: int = 1, recompute: str = "none",
                dtype: torch.dtype = torch.bfloat16, cache_dir: str | Path | None = None,
                use_cache: bool = True, loss: str = "full") -> ModelTrace:
    """Trace `config` (a ModelConfig, preset name or config directory) at (seq_len, micro_batch).

    `recompute` selects the policy whose saved bytes and recompute FLOPs the graph's layer nodes
    carry; summaries hold every policy. `loss` is the runtime's loss kernel ('full' logits or
    'chunked'). Results are cached under `cache_dir` (default $XPLAN_CACHE_DIR or ~/.cache/xplan)
    unless `use_cache` is False.
    """
    from xplan.errors import InputError
    from xplan.runtime import load_config

    if not hasattr(config, "family"):
        config = load_config(config)
    if int(seq_len) < 1 or int(micro_batch) < 1:
        raise InputError(f"seq_len and micro_batch must be positive; got {seq_len} and {micro_batch}.")
    try:
        rc.check_policy(recompute)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if loss not in LOSS_KERNELS:
        raise InputError(f"loss kernel must be one of {', '.join(LOSS_KERNELS)}; got {loss!r}.")
    seq_len, micro_batch = int(seq_len), int(micro_batch)
    key = trace_cache.cache_key(config, seq_len, micro_batch, recompute, dtype, loss) if use_cache else None
    if key is not None:
        hit = trace_cache.load(cache_dir, key)
        if isinstance(hit, ModelTrace):
            hit.from_cache = True
            return hit
    trace = _trace(config, seq_len, micro_batch, recompute, dtype, loss)
    if key is not None:
        trace_cache.store(cache_dir, key, trace)
    return trace
