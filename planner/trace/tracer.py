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

Token tiling (`tiles` > 1): every block runs its feed-forward half in that many token tiles, each
under its own checkpoint (xplan.runtime.models.tiling), as a rank of a layout with `tile_tokens`
runs it; a rank's tile count, traced at micro-batch 1, scales to its tokens like every other
tensor. Ops of a tile carry `tile_tokens`; the tile's forward redone in the backward is marked
`recompute` and counted in `recompute_flops` (every policy), not in the model FLOPs.

Long sequences: past `EXPANDED_LOSS_CHUNKS` chunks, the 'chunked' loss runs one chunk of each
distinct size (`loss.representative_chunks`) and the ops of a chunk that stands for n carry
`repeat` = n with their FLOPs and bytes multiplied by n (cost models price n calls of the traced
shape); below it every chunk is traced, as the runtime runs them.

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

import contextlib
import dataclasses
import time
from collections import Counter

import networkx as nx
import torch
from torch import nn

from xplan.runtime import recompute as rc
from xplan.runtime.models.tiling import TokenTiling, observing_tiles

from . import cache as trace_cache
from .model_trace import ROLES, BlockSummary, ModelTrace
from .recorder import OpRecorder, Scope, ScopeTracker, StageInfo

# Most loss chunks traced one by one (shorter traces are exactly the runtime's op sequence); past
# it, one chunk per distinct size stands for the rest (16M tokens would be 16k chunks). The two
# price alike but for one launch per chunk boundary, which the expanded trace's elementwise fusion
# merges across chunks (qwen3-8b at 64k tokens: 63 launches, 1e-5 of the step), so the bound
# only keeps every published row's trace (32k tokens at most) as it was; past it a trace at 128k
# tokens takes a third of the time (every chunk traced three times, once per recompute policy).
EXPANDED_LOSS_CHUNKS = 32

NON_BLOCK_GROUPS = {"embed": "embedding", "rotary": "embedding", "model": "embedding", "norm": "head",
                    "head": "head", "vision": "vision", "vision_embed": "vision"}
# A vision-language model's vision tower is a group of its own, "vision", in two stages: "vision",
# the encoder layers (one recompute setting for all of them, `Layout.vision_recompute`, measured
# under each policy like the decoder blocks), and "vision_embed", the patch embedding, pixel
# shuffle and projector (never recomputed). Both run before the first decoder layer, on the first
# pipeline rank.
_STAGE_OF_CHILD = {"embed_tokens": "embed", "rotary_emb": "rotary", "norm": "norm", "lm_head": "head",
                   "vision_tower": "vision_embed", "multi_modal_projector": "vision_embed"}


# --------------------------------------------------------------------------------------------------
# Skeleton


def _block_kinds(config) -> list[str]:
    from xplan.runtime.models.transformer import DecoderLayer

    return [DecoderLayer.block_kind(config, i) for i in range(config.num_layers)]


def build_skeleton(config, dtype: torch.dtype, fake_mode) -> tuple[nn.Module, list[str], list[int]]:
    """The runtime's CausalLM with one decoder layer per block kind, on fake CPU tensors (a
    vision-language model keeps its whole vision tower)."""
    from xplan.runtime.models.transformer import DecoderLayer, model_class

    kinds = _block_kinds(config)
    reps: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        reps.setdefault(kind, i)
    with torch.device("meta"):
        model = model_class(config)(dataclasses.replace(config, num_layers=0))
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
        elif parts[:3] == ["vision_tower", "encoder", "layer"] and len(parts) >= 4:
            scopes[module] = Scope("vision", ".".join(parts[1:]))
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


def training_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, kind: str,
                  pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """The runtime's training loss (sum of token losses, computed inside the LM head's call)."""
    from xplan.runtime.train.loss import token_loss_sum

    return token_loss_sum(model, input_ids, labels, kind=kind, pixel_values=pixel_values)


# --------------------------------------------------------------------------------------------------
# Trace


def _run(model, scopes, stage_inputs, param_scopes, stages, micro_batch, seq_len, loss_kind, detailed, backward,
         fake, image_tokens=0):
    """One traced training step. Returns (recorder, storages alive after the forward, backward
    peak bytes per stage; {} without `backward`)."""
    tracker = ScopeTracker(scopes, stage_inputs, param_scopes).install()
    rec = OpRecorder(tracker, stages, seq_len, detailed=detailed, timeline=backward)
    rec.grads_at_peak = {}
    peaks: dict[str, dict[str, int]] = {}
    hooks = []
    marks: list[tuple[int, int]] = []  # (op index, repeats) where a representative loss chunk starts / ends
    chunks = _loss_chunks(marks, rec) if loss_kind == "chunked" and _compress_loss(micro_batch * seq_len) else (
        contextlib.nullcontext())
    try:
        with fake, rec, chunks, observing_tiles(rec.on_tile):
            # Inputs are made under the recorder: the embedding keeps the token ids and the loss
            # its labels for backward, as in training.
            ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            pixels = None
            if image_tokens:  # the runtime's synthetic layout: a sample's images first
                from xplan.runtime.train.data import image_batch

                tracker.push(Scope("vision_embed"))
                ids, pixels = image_batch(ids, model.spec, image_tokens)
                tracker.pop()
            tracker.push(Scope("head"))
            labels = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            tracker.pop()
            loss = training_loss(model, ids, labels, loss_kind, pixels)
            del ids, labels, pixels
            alive = rec.alive()
            if backward:
                hooks = _note_parameter_gradients(loss, model, rec.param_grads)
                loss.backward()
            del loss
        if backward:
            grads = {p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None}
            peaks = rec.backward_peaks(exclude=grads | rec.param_grads, final=grads)
    finally:
        tracker.remove()
        for hook in hooks:
            hook.remove()
    for p in model.parameters():
        p.grad = None
    _scale_repeated(rec.ops, marks)
    return rec, alive, peaks


def _note_parameter_gradients(loss: torch.Tensor, model: nn.Module, sink: set[int]) -> list:
    """Hooks that add to `sink` the storage of every gradient an autograd node hands to a parameter.

    Parameter gradients are priced with the parameters, not as backward workspace. A parameter used
    several times (each token tile uses the block's weights once) receives one gradient per use,
    summed by autograd before it becomes `.grad`; the recorder follows those sums (`param_grads`).
    """
    accumulators = set()
    for param in model.parameters():
        if param.requires_grad:
            accumulators.add(torch.autograd.graph.get_gradient_edge(param).node)
    hooks, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        to_params = [i for i, (nxt, _) in enumerate(node.next_functions) if nxt in accumulators]
        if to_params:
            def note(grad_inputs, grad_outputs, indices=tuple(to_params)):
                for i in indices:
                    if grad_inputs[i] is not None:
                        sink.add(grad_inputs[i].untyped_storage()._cdata)
            hooks.append(node.register_hook(note))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None and nxt not in accumulators)
    return hooks


def _compress_loss(tokens: int) -> bool:
    from xplan.runtime.train.loss import DEFAULT_CHUNK_TOKENS

    return tokens > EXPANDED_LOSS_CHUNKS * DEFAULT_CHUNK_TOKENS


def _loss_chunks(marks: list[tuple[int, int]], rec):
    from xplan.runtime.train.loss import representative_chunks

    return representative_chunks(lambda repeats: marks.append((len(rec.ops), repeats)))


def _scale_repeated(ops, marks: list[tuple[int, int]]) -> None:
    """Ops of a loss chunk that stands for `repeats` chunks: FLOPs and bytes times `repeats`."""
    for (begin, repeats), (end, _) in zip(marks[::2], marks[1::2], strict=True):
        if repeats == 1:
            continue
        for op in ops[begin:end]:
            op.flops *= repeats
            op.flops_dense *= repeats
            op.bytes_read *= repeats
            op.bytes_written *= repeats
            op.extra["repeat"] = repeats


def trace_uncached(config, seq_len: int, micro_batch: int, recompute: str, dtype: torch.dtype,
                   loss: str, tiles: int = 1, image_tokens: int = 0) -> ModelTrace:
    """Trace `config` now (see the module docstring); `trace_model` is the cached front. `dtype` is
    a torch dtype or its name; `tiles` the token tiles of each block's feed-forward half;
    `image_tokens` per sample run the vision tower (vision-language models)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .graph import build_graph

    start = time.perf_counter()
    fake = FakeTensorMode()
    model, rep_kinds, rep_indices = build_skeleton(config, dtype, fake)
    layers = list(model.model.layers)
    vision_layers = list(model.vision_tower.encoder.layer) if hasattr(model, "vision_tower") else []
    for layer in layers:
        layer.token_tiling = TokenTiling(tiles=tiles) if tiles > 1 else None
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
                                 detailed=True, backward=True, fake=fake, image_tokens=image_tokens)
        saved = {"none": _saved_by_stage(alive)}
        backward_peaks = {"none": peaks}
        backward_grads = {"none": rec.grads_at_peak}
        for nbytes, op_index, _ in alive:
            rec.ops[op_index].saved_bytes += nbytes
        for policy in rc.RECOMPUTE_POLICIES:
            if policy == "none":
                continue
            for layer in layers + vision_layers:
                rc.apply_recompute(layer, policy)
            try:
                rec_p, alive_p, peaks_p = _run(model, scopes, stage_inputs, param_scopes, stages, micro_batch,
                                               seq_len, loss, detailed=False, backward=True, fake=fake,
                                               image_tokens=image_tokens)
            finally:
                for layer in layers + vision_layers:
                    rc.apply_recompute(layer, "none")
            saved[policy] = _saved_by_stage(alive_p)
            backward_peaks[policy] = peaks_p
            backward_grads[policy] = rec_p.grads_at_peak

    tokens = seq_len * micro_batch
    kinds = _block_kinds(config)
    counts = Counter(kinds)
    indices: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        indices.setdefault(k, []).append(i)

    def summary(name: str, stage_names: set[str], count: int) -> BlockSummary:
        b = BlockSummary(kind=name, count=count, layer_indices=tuple(indices.get(name, ())))
        tile_redo = 0
        for op in rec.ops:
            if op.scope.stage not in stage_names:
                continue
            if op.phase == "forward":
                b.flops_forward += op.flops
                b.flops_dense_forward += op.flops_dense
                b.bytes_forward += op.bytes_read + op.bytes_written
            elif op.extra.get("recompute"):  # a tile's forward redone: priced, not model FLOPs
                tile_redo += op.flops
                b.bytes_backward += op.bytes_read + op.bytes_written
            else:
                b.flops_backward += op.flops
                b.bytes_backward += op.bytes_read + op.bytes_written
        b.recompute_flops = {"none": tile_redo}
        redone = {name} if name in counts else ({"vision"} if name == "vision" else set())  # what recompute reruns
        forward = [op for op in rec.ops if op.scope.stage in redone and op.phase == "forward"]
        b.recompute_flops["full"] = tile_redo + sum(op.flops for op in forward)
        b.recompute_flops["selective"] = tile_redo + sum(op.flops for op in forward if not op.selective_saved)
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
            b.backward_grads = {p: dict(by_stage.get(name, {})) for p, by_stage in backward_grads.items()}
        else:  # head / embedding: their stages' backwards run one after another, so the worst one
            b.backward_peak = {p: _worst_stage_peak(by_stage, stage_names) for p, by_stage in backward_peaks.items()}
        return b

    blocks = {k: summary(k, {k}, counts[k]) for k in rep_kinds}
    others = {}
    stages_seen = {op.scope.stage for op in rec.ops} | {scope.stage for scope in scopes.values()}
    for group in ("embedding", "head", "vision"):
        members = {s for s in stages_seen | set(NON_BLOCK_GROUPS) if s not in blocks and group_of(s) == group}
        if group != "vision" or vision_layers:
            others[group] = summary(group, members, 1)
    params_total = sum(b.count * b.params_total for b in (*blocks.values(), *others.values()))
    params_active = sum(b.count * b.params_active for b in (*blocks.values(), *others.values()))
    trace = ModelTrace(
        model=config.name, family=config.family, seq_len=seq_len, micro_batch=micro_batch,
        dtype=str(dtype).removeprefix("torch."), recompute=recompute, loss=loss, layer_kinds=tuple(kinds),
        blocks=blocks, others=others, graph=nx.DiGraph(), params_total=params_total,
        params_active=params_active, code_version=trace_cache.code_version(), tiles=tiles,
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
