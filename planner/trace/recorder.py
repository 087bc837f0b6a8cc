"""The dispatch-mode recorder: every aten op the runtime's model runs, with its module, FLOPs, bytes,
producers (data flow) and the storages it creates (to measure what stays alive for backward).

Scopes. Forward ops belong to the innermost module running (module pre/post hooks). Backward ops
belong to the module whose forward created the autograd node being executed: hooks record the
autograd sequence number at each module boundary, and `torch._C._current_autograd_node()` tells a
backward op which node it serves; a bisect maps the node's sequence number back to the module.

Stages. The skeleton model's modules are grouped into stages: `embed`, `rotary`, one stage per
decoder-block kind, `norm`, `head`, `loss` and `model` (glue code outside any module). A stage's
saved bytes are the storages created in it that are still alive after the forward, plus its input
when that stays alive (a block's input is owned by the block that saves it, not by the block that
produced it), so per-stage numbers add up to the model's total.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from xplan.runtime.compat import fake_grouped_mm
from xplan.runtime.models.blockwise_attention import BlockCount, current_block
from xplan.runtime.models.blockwise_attention import in_kernel as in_blockwise_kernel
from xplan.runtime.models.tiling import current_tile
from xplan.runtime.recompute import selective_saves

from .flops import (
    BATCHED_MATMUL_PACKETS,
    GROUPED_MM_PACKETS,
    arg,
    attention_fraction,
    is_sdpa,
    kernel_recompute_flops,
    op_flops,
    shape_str,
    span_bytes,
)

_SKIP = {torch.ops.prim.device.default}
_ACCUMULATE_GRAD_SEQ = 2**63  # AccumulateGrad nodes carry UINT64_MAX


@dataclass(frozen=True)
class Scope:
    stage: str  # 'embed', 'rotary', a block kind, 'norm', 'head', 'loss', 'model'
    path: str = ""  # module path inside the stage ('' = the stage's own module)


@dataclass
class StageInfo:
    """What the recorder needs to know about one stage."""

    name: str
    attention_window: int | None = None  # sliding window of the stage's attention, if any
    attention_prefix: str = "self_attn"  # module path of the attention sub-block

    def in_attention(self, path: str) -> bool:
        """Whether a module path of this stage lies in its attention sub-block."""
        return path == self.attention_prefix or path.startswith(self.attention_prefix + ".")


@dataclass
class OpRecord:
    index: int
    op: str
    phase: str  # 'forward' | 'backward'
    scope: Scope
    flops: int = 0  # model FLOPs (attention masked: causal half, sliding window; no kernel recompute)
    flops_dense: int = 0  # torch's flop-counter convention: every query sees every key
    bytes_read: int = 0
    bytes_written: int = 0
    inputs: tuple[int, ...] = ()
    out_shape: str = ""
    out_dtype: str = ""
    attention: bool = False
    mask_fraction: float = 1.0
    selective_saved: bool = False
    saved_bytes: int = 0  # bytes of its outputs still alive after the forward
    extra: dict = field(default_factory=dict)


class ScopeTracker:
    """Module hooks that maintain the current scope in forward and map autograd nodes to scopes."""

    def __init__(self, module_scopes: dict[torch.nn.Module, Scope], stage_inputs: set[torch.nn.Module],
                 param_scopes: dict[int, Scope]):
        self.module_scopes = module_scopes
        self.stage_inputs = stage_inputs  # modules whose first input is owned by their stage
        self.param_scopes = param_scopes  # id(parameter) -> scope, for AccumulateGrad nodes
        self.stack: list[Scope] = [Scope("model")]
        self._seq: list[int] = [0]
        self._seq_scope: list[Scope] = [Scope("model")]
        self._handles: list = []
        self.on_stage_input = None  # callback(tensor, stage)

    def install(self) -> ScopeTracker:
        for module, scope in self.module_scopes.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(module, scope)))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _mark(self) -> None:
        seq = torch._C._autograd._get_sequence_nr()
        if self._seq and self._seq[-1] == seq:
            self._seq_scope[-1] = self.stack[-1]
        else:
            self._seq.append(seq)
            self._seq_scope.append(self.stack[-1])

    def _pre(self, module, scope):
        def hook(mod, args):
            if module in self.stage_inputs and self.on_stage_input is not None and args:
                if isinstance(args[0], torch.Tensor):
                    self.on_stage_input(args[0], scope.stage)
            self.push(scope)

        return hook

    def _post(self, module, args, output):
        self.pop()

    def push(self, scope: Scope) -> None:
        self.stack.append(scope)
        self._mark()

    def pop(self) -> None:
        if len(self.stack) > 1:
            self.stack.pop()
        self._mark()

    @property
    def current(self) -> Scope:
        return self.stack[-1]

    def backward_scope(self) -> Scope:
        node = torch._C._current_autograd_node()
        if node is None:
            return Scope("loss")
        seq = node._sequence_nr()
        if seq >= _ACCUMULATE_GRAD_SEQ:
            variable = getattr(node, "variable", None)
            return self.param_scopes.get(id(variable), Scope("model"))
        i = bisect.bisect_right(self._seq, seq) - 1
        return self._seq_scope[max(i, 0)]


def block_mask_fraction(block: BlockCount) -> float:
    """Model-FLOP share of one blockwise-attention matmul: the pairs its block keeps, scaled so
    that the blocks of one attention add up to `attention_fraction`'s convention (causal = 1/2 of
    all pairs, not the discrete (s + 1) / 2s); 0 for the backward's recomputed scores."""
    if not block.kept or not block.kept_total:
        return 0.0
    convention = attention_fraction(block.seq_q, block.seq_k, True, block.window) * block.seq_q * block.seq_k
    return block.kept / block.computed * convention / block.kept_total


def _is_alias(func, ins, outs) -> bool:
    """Views (and view-returning ops like split): no new memory, no bytes moved, not a graph node."""
    if func.is_view:
        return True
    if func._schema.is_mutable or not ins:
        return False
    sources = {t.untyped_storage()._cdata for t in ins}
    return all(t.untyped_storage()._cdata in sources for t in outs)


class OpRecorder(TorchDispatchMode):
    """Records the ops below autograd. `detailed=False` only tracks storages (for saved bytes)."""

    def __init__(self, scopes: ScopeTracker, stages: dict[str, StageInfo], seq_len: int, detailed: bool = True,
                 timeline: bool = False):
        super().__init__()
        # timeline: also register backward outputs and note the op at which each storage is first
        # seen dead, for per-stage backward peaks (`backward_peaks`).
        self.timeline = timeline
        self._pending: list[int] = []  # keys of registered storages not yet seen dead
        self.deaths: dict[int, int] = {}  # storage key -> first op index at which it was dead
        self.scopes = scopes
        self.stages = stages
        self.seq_len = seq_len
        self.detailed = detailed
        self.ops: list[OpRecord] = []
        self.producer = WeakIdKeyDictionary()  # tensor -> index of the op that produced it
        # Token tiles of the forward (runtime/models/tiling.py): autograd sequence numbers where a
        # tile starts or ends, and the tile's tokens from there on (0: outside any tile), so a
        # backward op finds the tile of the forward op it differentiates.
        self._tile_marks: list[int] = []
        self._tile_tokens: list[int] = []
        # Storages of gradients on their way to a parameter (filled by the tracer's node hooks) and
        # autograd's sums of them (one gradient per use of a weight, e.g. per token tile).
        self.param_grads: set[int] = set()
        # storage pointer -> [weak ref, nbytes, creating op index, owning stage]
        self.storages: dict[int, list] = {}
        scopes.on_stage_input = self.own_input

    # -- token tiles ----------------------------------------------------------------------------
    def on_tile(self, tile) -> None:
        """Observer of `tiling.observing_tiles`: a forward tile starts (tile) or ends (None)."""
        if torch._C._current_graph_task_id() != -1:  # a tile's recompute, inside the backward
            return
        self._tile_marks.append(torch._C._autograd._get_sequence_nr())
        self._tile_tokens.append(tile.tokens if tile is not None else 0)

    def _tile_of_op(self, backward: bool) -> int:
        """Tokens of the tile the running op belongs to (0: none)."""
        tile = current_tile()
        if tile is not None:
            return tile.tokens
        node = torch._C._current_autograd_node() if backward and self._tile_marks else None
        if node is None:
            return 0
        i = bisect.bisect_right(self._tile_marks, node._sequence_nr()) - 1
        return self._tile_tokens[i] if i >= 0 else 0

    # -- storages -------------------------------------------------------------------------------
    def own_input(self, t: torch.Tensor, stage: str) -> None:
        entry = self.storages.get(t.untyped_storage()._cdata)
        if entry is not None:
            entry[3] = stage

    def _register(self, t: torch.Tensor, index: int, stage: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.storages:
            return
        self.storages[key] = [StorageWeakRef(storage), storage.nbytes(), index, stage]
        if self.timeline:
            self._pending.append(key)

    def _sweep(self, index: int) -> None:
        still = []
        for key in self._pending:
            if self.storages[key][0].expired():
                self.deaths[key] = index
            else:
                still.append(key)
        self._pending = still

    def backward_peaks(self, exclude: set[int], final: set[int] | None = None) -> dict[str, dict[str, int]]:
        """Per stage and part ('attention' sub-block, 'mlp' = the rest): the most bytes alive at
        once while that part's backward ops run, above what was alive when the stage's first
        backward op started (its saved activations, the incoming gradient and everything outside
        the stage). Storages in `exclude` (parameter gradients, priced separately) are left out.
        `final`: the parameters' `.grad` storages (the share of gradients alive at each peak is
        counted against them). Needs `timeline=True`."""
        n = len(self.ops) + 1
        diff = [0] * (n + 1)
        created = [0] * n
        for key, (_, nbytes, index, _) in self.storages.items():
            if key in exclude:
                continue
            diff[index] += nbytes
            diff[self.deaths.get(key, n)] -= nbytes
            created[index] += nbytes
        live, running = [0] * n, 0
        for t in range(n):
            running += diff[t]
            live[t] = running
        # Per stage, the backward ops of its attention sub-block and of everything else (the MLP /
        # MoE, norms, a checkpoint's recomputed forward), each against the stage's starting point.
        first: dict[str, int] = {}
        parts: dict[tuple[str, str], list[int]] = {}
        for op in self.ops:
            if op.phase != "backward":
                continue
            stage = op.scope.stage
            first.setdefault(stage, op.index)
            info = self.stages.get(stage) or StageInfo(stage)
            parts.setdefault((stage, "attention" if info.in_attention(op.scope.path) else "mlp"), []).append(op.index)
        peaks: dict[str, dict[str, int]] = {}
        self.grads_at_peak: dict[str, dict[str, float]] = {}
        for (stage, part), indices in parts.items():
            baseline = live[first[stage]] - created[first[stage]]
            top = max(indices, key=lambda t: live[t])
            peaks.setdefault(stage, {})[part] = live[top] - baseline
            self.grads_at_peak.setdefault(stage, {})[part] = self._grads_alive(exclude, stage, top, n, final)
        return peaks

    def _grads_alive(self, grads: set[int], stage: str, index: int, end: int, final: set[int] | None) -> float:
        """Bytes of `stage`'s parameter gradients alive at op `index` (final ones, and those on their
        way: a tile's gradient beside the sum of the tiles before it) over the bytes of its final
        gradients (FSDP holds a block's gradients until its backward ends: the cost model adds this
        share at each peak; above 1 where a tile's gradient and the running sum are both alive)."""
        total = alive = 0
        for key in grads:
            entry = self.storages.get(key)
            if entry is None or entry[3] != stage:
                continue
            total += entry[1] if final is None or key in final else 0
            alive += entry[1] if entry[2] <= index < self.deaths.get(key, end) else 0
        return alive / total if total else 1.0

    def alive(self) -> list[tuple[int, int, str]]:
        """(nbytes, creating op, owning stage) of every recorded storage still alive."""
        return [(e[1], e[2], e[3]) for e in self.storages.values() if not e[0].expired()]

    # -- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = fake_grouped_mm(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if func in _SKIP:
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        backward = torch._C._current_graph_task_id() != -1
        scope = self.scopes.backward_scope() if backward else self.scopes.current
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if _is_alias(func, ins, outs):
            src = self.producer.get(ins[0]) if ins else None
            if src is not None:
                for t in outs:
                    self.producer[t] = src
            return out
        index = len(self.ops)
        record = OpRecord(index, str(func.overloadpacket).removeprefix("aten."),
                          "backward" if backward else "forward", scope)
        self.ops.append(record)
        if backward and self.timeline:
            self._sweep(index)
            if self.param_grads and func.overloadpacket is torch.ops.aten.add and all(
                    t.untyped_storage()._cdata in self.param_grads for t in ins):
                self.param_grads.update(t.untyped_storage()._cdata for t in outs)
        if not backward or self.timeline:
            for t in outs:
                self._register(t, index, scope.stage)
        if self.detailed:
            self._detail(record, func, args, kwargs, out, ins, outs)
            tile_tokens = self._tile_of_op(backward)
            if tile_tokens:
                record.extra["tile_tokens"] = tile_tokens
                if backward and current_tile() is not None:  # a tile's forward redone before its backward
                    record.extra["recompute"] = True
        for t in outs:
            self.producer[t] = index
        return out

    def _detail(self, record: OpRecord, func, args, kwargs, out, ins, outs) -> None:
        producers = []
        for t in ins:
            p = self.producer.get(t)
            if p is not None and p not in producers:
                producers.append(p)
        record.inputs = tuple(producers)
        seen = set()
        read = 0
        for t in ins:
            key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key not in seen:
                seen.add(key)
                read += span_bytes(t)
        record.bytes_read = read
        record.bytes_written = sum(span_bytes(t) for t in outs)
        record.out_shape = shape_str(outs[0])
        record.out_dtype = str(outs[0].dtype).removeprefix("torch.")
        if record.phase == "forward":
            record.selective_saved = selective_saves(func, args, kwargs)
        try:
            dense = op_flops(func, args, kwargs, out)
            model = dense - kernel_recompute_flops(func, args, kwargs)
        except Exception:  # an op whose formula rejects its arguments: priced as data movement
            dense = model = 0
        record.flops_dense = dense
        record.flops = model
        packet = func.overloadpacket
        if packet in GROUPED_MM_PACKETS:
            offs = arg(func, args, kwargs, "offs")
            if offs is not None:
                groups = int(offs.shape[0])
                record.extra["groups"] = groups
                if args[0].dim() == 2 and args[1].dim() == 3:  # rows split over groups
                    record.extra["rows_per_group"] = args[0].shape[0] / groups
        if in_blockwise_kernel():  # inside the runtime's blockwise attention: a fused kernel's work
            record.extra["in_attention_kernel"] = True
        block = current_block()
        if dense and block is not None:  # one block of the runtime's blockwise attention
            record.attention = True
            record.mask_fraction = block_mask_fraction(block)
            record.flops = round(model * record.mask_fraction)
        elif dense and self._is_attention(record, func, args, kwargs, ins, outs):
            stage = self.stages.get(record.scope.stage)
            causal = True
            if is_sdpa(func):
                causal = bool(arg(func, args, kwargs, "is_causal", False)) or (
                    arg(func, args, kwargs, "attn_mask") is not None or arg(func, args, kwargs, "attn_bias") is not None
                )
            window = stage.attention_window if stage else None
            fraction = attention_fraction(self.seq_len, self.seq_len, causal, window)
            record.attention = True
            record.mask_fraction = fraction
            record.flops = round(model * fraction)

    def _is_attention(self, record: OpRecord, func, args, kwargs, ins, outs) -> bool:
        """Attention products: SDPA kernels, and batched matmuls in the attention sub-block with a
        [seq, seq] (query x key) operand or result (the explicit masked path and its backward)."""
        stage = self.stages.get(record.scope.stage)
        if stage is None:
            return False
        if not stage.in_attention(record.scope.path):
            return False
        if is_sdpa(func):
            return True
        if func.overloadpacket not in BATCHED_MATMUL_PACKETS:
            return False
        s = self.seq_len
        return any(t.dim() >= 2 and tuple(t.shape[-2:]) == (s, s) for t in (*ins, *outs))
