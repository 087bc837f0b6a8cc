"""`xplan run --dry-run`: the runtime's own training step at full scale on one CPU, memory tracked.

What runs (the same code as `xplan run`, only the tensors and the process group are fake):
1. a fake process group (`torch.testing._internal.distributed.fake_pg.FakeStore`, backend
   ``"fake"``) at the plan's world size, this process being rank 0, and the plan's meshes
   (`build_meshes`);
2. the model built on meta and materialised under `FakeTensorMode` (no memory, no compute), the
   plan's kernels (`apply_kernels`) and `parallelize` (EP → Ulysses → recompute → FSDP2 with the
   plan's mixed precision), the plan's AdamW (`build_optimizer`) and LR schedule;
3. warm-up: one optimizer step on zero gradients so the AdamW states exist (a real run's steady
   state), then the measured step: ``min(grad_accum, 2)`` micro-batches of the plan's
   ``micro_batch`` sequences (this rank's ``seq_len / sp`` chunk) through `token_loss_sum` (the
   plan's loss kernel inside the LM head) and backward, gradient clipping on the global norm, the
   optimizer and scheduler steps, `zero_grad(set_to_none=True)` — the train loop's sequence. A
   second micro-batch is what makes accumulated gradients resident during a forward, as in every
   micro-batch after the first of a real step; later micro-batches repeat its peak.

Memory is tracked by `DryRunMemTracker`, torch's `FSDPMemTracker` (a dispatch mode that follows
every tensor storage and FSDP2's hooks) with these changes: tensors DTensor creates to propagate
shapes (global-shape outputs computed under the same fake mode) are not counted; every FSDP2
all-gather output and reduce-scatter input is labelled as such (explicit backward prefetch runs
outside the hook FSDPMemTracker watches); tensors made inside the LM head (the loss), by
expert-parallel or Ulysses all-to-alls and by the optimizer step (outside its states) get their own
categories; the expert units' FSDP2 hooks are put back inside their selective-recompute guards (the
tracker re-registers them first/last); and peaks are kept per moment (phase and running decoder
layer) with their breakdown and module. Components (`COMPONENTS`) use the cost model's names; a
component sum equals the peak. While the dry run builds FSDP2 units, `_chunk_with_empty` makes only
the chunks FSDP2 reads (the same views; creating all world-size chunks of every parameter under
fake tensors was half the run time).

Which rank: every rank runs the same shapes under fake tensors; rank 0 holds the largest FSDP shards
(FSDP2 pads the last ranks' shards) and the expert-parallel receive side is the busiest rank's
(even split × the routing imbalance, see `runtime.distributed.expert_parallel`), so rank 0's peak is
the per-rank peak of the largest rank.

Not simulated: allocator rounding and fragmentation (the cost model's `overhead`, excluded from
the compared peak), the CUDA/NCCL context, and host offload (fake tensors all live on one
device: offloaded bytes are counted on the device, a note says so).

Reduced depth (`layers=`, at least 3): the layer sequence is cut into runs of a repeated block
pattern (DeepSeek-V3: [dense x 3][moe x 58]; GPT-OSS: [(sliding, full) x 18]; a recompute fraction
splits a run); runs longer than ``layers + 1`` copies keep ``layers`` copies, plus one extra run per
such segment with one more copy. Peaks are kept per moment (phase and the running layer's place: its
segment, pattern position and first / interior / last copy), each moment is extrapolated linearly
to the full copy counts, and the largest is the peak. `tests/test_dryrun.py` checks that this equals
the full-depth run. Full depth is the default: it takes about a minute (DeepSeek-V3, 2 cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xplan.errors import InputError

GIB = 2**30

# Components, in the cost model's names (cost_models.memory.MemoryBreakdown) plus `communication`.
COMPONENTS = ("parameters", "gradients", "optimizer", "gathered_parameters", "activations", "logits_loss",
              "temporaries", "communication", "overhead")

# Extra tracker categories (FSDPMemTracker's own are the _FSDPRefType values).
OPT_TEMP, LOSS, COMM, COMM_FWD = "Optimizer Temp", "Loss", "Communication", "Communication (forward)"

# Tracker category -> component.
_CATEGORY_COMPONENT = {
    "Sharded Param": "parameters",
    "Buffer": "parameters",
    "Sharded Grad": "gradients",
    "OptState": "optimizer",
    "Unsharded Param": "gathered_parameters",
    "All Gather": "gathered_parameters",
    "Activation": "activations",
    "Inputs": "activations",
    LOSS: "logits_loss",
    "Temp": "temporaries",
    "Unsharded Grad": "temporaries",
    "Reduce Scatter": "temporaries",
    OPT_TEMP: "temporaries",
    COMM: "communication",
    COMM_FWD: "activations",  # all-to-all outputs made in forward live on only as saved activations
}

_PROPAGATION = threading.local()
_LAYER = re.compile(r"\.layers\.(\d+)(?:\.|$)")


def _a2a_ops() -> frozenset:
    ops = set()
    for namespace, name in (("_c10d_functional", "all_to_all_single"), ("_c10d_functional_autograd", "all_to_all_single"),
                            ("c10d", "alltoall_base_")):
        packet = getattr(getattr(torch.ops, namespace, None), name, None)
        if packet is not None:
            ops.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


@contextlib.contextmanager
def _skip_sharding_propagation():
    """Mark DTensor's shape propagation (it runs the op on global-shape fake tensors under the active
    fake mode) so the tracker does not count those tensors as memory."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, op_schema):
        _PROPAGATION.depth = getattr(_PROPAGATION, "depth", 0) + 1
        try:
            return original(self, op_schema)
        finally:
            _PROPAGATION.depth -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


class _LazyChunks(Sequence):
    """`torch.chunk(tensor, num_chunks, dim)` padded with empty tensors to `num_chunks` entries (FSDP2's
    `_chunk_with_empty`), making only the views that are read. FSDP2 reads one or two of the
    world-size chunks of every parameter; creating all of them costs ~25 µs each under fake tensors
    (half of a DeepSeek-V3 dry run at 256 ranks). Views are the same `narrow`s `torch.chunk` makes."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        n = tensor.size(dim)
        self.size = -(-n // num_chunks)
        self.real = -(-n // self.size)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_chunks))]
        if index < 0:
            index += self.num_chunks
        if not 0 <= index < self.num_chunks:
            raise IndexError(index)
        if index >= self.real:
            return self[0].new_empty(0)
        start = index * self.size
        return self.tensor.narrow(self.dim, start, min(self.size, self.tensor.size(self.dim) - start))


def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int):
    """Drop-in for FSDP2's `_chunk_with_empty` (lazy views; eager for empty dims)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    if tensor.dim() == 0 or tensor.size(dim) == 0:
        return _chunk_with_empty(tensor, num_chunks, dim)
    return _LazyChunks(tensor, num_chunks, dim)


@contextlib.contextmanager
def _lazy_fsdp_chunks():
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = _fsdp_param._chunk_with_empty
    _fsdp_param._chunk_with_empty = chunk_with_empty
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


@dataclass
class PhasePeak:
    """The largest tracked total of one moment (phase, running layer) and the breakdown then (bytes by
    tracker category; they sum to `bytes`)."""

    bytes: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    where: str = ""


def _make_tracker_class():
    from torch._guards import active_fake_mode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    c10d = torch.ops.c10d
    wait_tensor = torch.ops._c10d_functional.wait_tensor.default
    a2a = _a2a_ops()

    class DryRunMemTracker(FSDPMemTracker):
        """FSDPMemTracker with loss / all-to-all / optimizer-temporary categories and per-moment peaks."""

        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, head: nn.Module | None):
            super().__init__(model, optimizer)
            self._ref_class = [*_FSDPRefType, OPT_TEMP, LOSS, COMM, COMM_FWD]  # snapshot keys
            self._head = head
            self.stage = "forward"  # set by the driver: 'step' (micro-batches) or 'optimizer'
            # (phase, index of the running decoder layer or None) -> peak; reduced-depth runs
            # extrapolate each of these moments separately (the maximum of them is not linear).
            self.peaks: dict[tuple[str, int | None], PhasePeak] = {}

        def _register_module_and_optimizer_hooks(self) -> None:
            super()._register_module_and_optimizer_hooks()
            _restore_recompute_guard_order(self._root_mod)

        def label_accumulated_grads(self) -> None:
            """Gradients kept unsharded across micro-batches (gradient sync deferred, fsdp == 1) are
            the gradient state, not backward temporaries: label them as gradients."""
            for module in self._root_mod.modules():
                state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
                group = state._fsdp_param_group if state is not None else None
                for fsdp_param in group.fsdp_params if group is not None else ():
                    for grad in (getattr(fsdp_param, "unsharded_accumulated_grad", None),
                                 fsdp_param._unsharded_param.grad):
                        if grad is not None:
                            self._update_and_maybe_create_winfos(grad, _FSDPRefType.SHARDED_GRAD)

        def _phase(self) -> str:
            if self._in_opt or self.stage == "optimizer":
                return "optimizer"
            return "backward" if self._mod_tracker.is_bw else "forward"

        def _in_head(self) -> bool:
            if self._head is None:
                return False
            fqn = self._mod_tracker.get_known_fqn(self._head)
            return fqn is not None and fqn in self._mod_tracker.parents

        def _block(self, phase: str) -> int | None:
            """Index (in this model) of the decoder layer running now: the innermost one the module
            tracker lists (backward hooks can lag by one layer: newest = lowest index there)."""
            found = [int(m.group(1)) for p in self._mod_tracker.parents if (m := _LAYER.search(p))]
            if not found:
                return None
            return min(found) if phase == "backward" else max(found)

        def _update_peak_stats(self, peak_state) -> None:  # peaks per (phase, running block) only
            for dev_snap in self._curr_mem_snap.values():
                total = dev_snap["Total"]
                phase = self._phase()
                key = (phase, self._block(phase))
                peak = self.peaks.get(key)
                if peak is None:
                    peak = self.peaks[key] = PhasePeak()
                if total > peak.bytes:
                    parents = sorted(p for p in self._mod_tracker.parents if p != "Global")
                    peak.bytes = total
                    peak.categories = {str(getattr(k, "value", k)): v for k, v in dev_snap.items() if k != "Total"}
                    peak.where = max(parents, key=len) if parents else "(top level)"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t == DTensor for t in types):
                return NotImplemented  # let DTensor desugar into local ops first
            if func is wait_tensor and active_fake_mode():
                res = args[0]  # eager wait returns its input; the meta kernel would allocate
            else:
                res = func(*args, **(kwargs or {}))
            if getattr(_PROPAGATION, "depth", 0) or active_fake_mode() is not self._fake_mode_on_entry:
                return res
            if self._in_opt:
                reftype = OPT_TEMP  # states are relabelled OptState by the step's post-hook
            elif func in a2a:
                reftype = COMM if self._mod_tracker.is_bw and not self._in_ac else COMM_FWD
            elif self._in_head():
                reftype = LOSS
            elif self._mod_tracker.is_bw and not self._in_ac:
                reftype = _FSDPRefType.TEMP
            else:
                reftype = _FSDPRefType.ACT
            # Only FSDP2 all-gathers and reduce-scatters in this runtime (EP and Ulysses use
            # all-to-all): label them whatever FSDP's state (explicit backward prefetch runs after
            # the tracked pre-backward, where FSDPMemTracker would call its buffer a temporary).
            if func is c10d._allgather_base_.default:
                self._update_and_maybe_create_winfos(args[0], _FSDPRefType.ALL_GATHER)
            if func is c10d._reduce_scatter_base_.default:
                self._update_and_maybe_create_winfos(args[1], _FSDPRefType.REDUCE_SCATTER)
            tree_map_only(torch.Tensor, lambda t: self._track(reftype, t), res)
            self._update_peak_stats(None)
            return res

    return DryRunMemTracker


def _restore_recompute_guard_order(model: nn.Module) -> None:
    """Put FSDP2's (now tracker-wrapped) hooks of expert units back inside their recompute guards.

    `run_fsdp_hooks_outside_recompute` brackets an expert unit's FSDP2 hooks with hooks that pop
    the selective-recompute modes; FSDPMemTracker re-registers FSDP2's forward pre-hook first and
    its forward hook last, outside the brackets, which breaks selective recompute (FSDP2's ops
    would be recorded in the forward and missing in the recompute). Order wanted:
    pre-hooks [leave, FSDP, reenter, ...], forward hooks [leave, FSDP, reenter].
    """
    from xplan.runtime.distributed.expert_parallel import _OutsideRecomputeRegion

    def guard(hook, name: str) -> bool:
        return isinstance(getattr(hook, "__self__", None), _OutsideRecomputeRegion) and hook.__name__ == name

    for module in model.modules():
        pre = [k for k, h in module._forward_pre_hooks.items() if guard(h, "leave")]
        post = [k for k, h in module._forward_hooks.items() if guard(h, "reenter")]
        for key in pre:
            module._forward_pre_hooks.move_to_end(key, last=False)
        for key in post:
            module._forward_hooks.move_to_end(key)


# --------------------------------------------------------------------------------------------------
# Report


@dataclass
class DryRunReport:
    """Measured (rank 0 under fake tensors) against predicted per-rank peak memory, in bytes."""

    model: str
    hardware: str
    layout: dict[str, Any]
    seq_len: int
    global_batch: int
    grad_accum: int
    micro_batches_run: int
    world_size: int
    rank: int
    imbalance: float
    measured_peak_bytes: float
    measured: dict[str, float]  # component -> bytes at the peak
    peak_phase: str  # forward | backward | optimizer
    peak_where: str  # innermost module running at the peak
    phases: dict[str, dict[str, Any]]  # phase -> {peak_bytes, where, components}
    categories: dict[str, float]  # raw tracker categories at the peak
    predicted: dict[str, float]  # component -> bytes (cost model), overhead included
    predicted_total_bytes: float  # the cost model's total (= the components' sum when it has them)
    predicted_source: str  # 'plan' or 'price'
    layers_total: int
    layers_run: int
    extrapolated: bool
    elapsed_s: float
    timings_s: dict[str, float] = field(default_factory=dict)  # where the time went (all runs)
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> float:
        """The cost model's per-rank peak without `overhead` (what a fake-tensor run can see)."""
        return self.predicted_total_bytes - self.predicted.get("overhead", 0.0)

    @property
    def ratio(self) -> float:
        return self.measured_peak_bytes / self.predicted_peak_bytes if self.predicted_peak_bytes else math.inf

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_peak_bytes - self.measured_peak_bytes) / self.measured_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hardware": self.hardware,
            "layout": self.layout,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "grad_accum": self.grad_accum,
            "micro_batches_run": self.micro_batches_run,
            "world_size": self.world_size,
            "rank": self.rank,
            "imbalance": self.imbalance,
            "measured_peak_gib": self.measured_peak_bytes / GIB,
            "predicted_peak_gib": self.predicted_peak_bytes / GIB,
            "predicted_total_gib": self.predicted_total_bytes / GIB,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,  # measured / predicted
            "error": self.error,  # (predicted - measured) / measured
            "components": {k: {"measured": self.measured.get(k, 0.0) / GIB, "predicted": self.predicted.get(k, 0.0) / GIB}
                           for k in COMPONENTS},
            "peak_phase": self.peak_phase,
            "peak_where": self.peak_where,
            "phases": {p: {"peak_gib": v["peak_bytes"] / GIB, "where": v["where"],
                           "components": {k: b / GIB for k, b in v["components"].items()}}
                       for p, v in self.phases.items()},
            "tracker_categories_gib": {k: v / GIB for k, v in self.categories.items()},
            "predicted_source": self.predicted_source,
            "layers_total": self.layers_total,
            "layers_run": self.layers_run,
            "extrapolated": self.extrapolated,
            "elapsed_s": self.elapsed_s,
            "timings_s": dict(self.timings_s),
            "notes": list(self.notes),
        }


def components_of(categories: dict[str, float]) -> dict[str, float]:
    """Tracker categories (bytes) -> components (bytes)."""
    out = dict.fromkeys(COMPONENTS, 0.0)
    for name, value in categories.items():
        out[_CATEGORY_COMPONENT.get(name, "temporaries")] += value
    return out


# --------------------------------------------------------------------------------------------------
# Predictions


def predicted_components(plan, imbalance: float, reprice: bool = False) -> tuple[dict[str, float], float, str]:
    """(component -> bytes, total bytes, source): the plan's recorded `predictions.memory_gib`, else
    `planner.pricing.price` now (source 'plan' or 'price')."""
    memory = None if reprice else (plan.data.predictions or {}).get("memory_gib")
    source = "plan"
    if not memory:
        from xplan.planner.pricing import Workload, price

        est = price(Workload(plan.model, plan.hardware, plan.training.seq_len, plan.training.global_batch,
                             imbalance), plan.layout)
        memory, source = est.memory.gib(), "price"
    if not isinstance(memory, dict):
        raise InputError("the plan's predictions.memory_gib must be a mapping of components to GiB (as `xplan search` "
                         "writes it); fix it or pass --reprice.")
    try:
        out = {k: float(memory.get(k, 0.0) or 0.0) * GIB for k in COMPONENTS}
        total = float(memory["total"]) * GIB if memory.get("total") is not None else sum(out.values())
    except (TypeError, ValueError):
        raise InputError("the plan's predictions.memory_gib holds a value that is not a number; fix it or pass "
                         "--reprice.") from None
    return out, total, source


# --------------------------------------------------------------------------------------------------
# Process group and model


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """A fake default process group (no communication) for the duration of the block."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from xplan.runtime.distributed.mesh import clear_mesh_cache

    if dist.is_initialized():
        raise RuntimeError("a dry run needs its own (fake) default process group, but one is already initialised "
                           "in this process; run the dry run in a fresh process.")
    clear_mesh_cache()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        clear_mesh_cache()
        dist.destroy_process_group()


def layer_classes(config, layout) -> list[tuple[str, str]]:
    """(block kind, recompute policy) of every decoder layer of the full model, in order."""
    from xplan.runtime.models.transformer import DecoderLayer

    policies = layout.recompute_policies(config.num_layers)
    return [(DecoderLayer.block_kind(config, i), policies[i]) for i in range(config.num_layers)]


@dataclass(frozen=True)
class Segment:
    """`repeats` consecutive copies of `pattern` (a tuple of (block kind, recompute policy)) in the
    layer sequence, starting at layer `start`."""

    start: int
    pattern: tuple[tuple[str, str], ...]
    repeats: int


def segments(classes: list[tuple[str, str]], max_period: int = 4) -> list[Segment]:
    """Cover the layer sequence, in order, with maximal repeated patterns: DeepSeek-V3 is
    [dense x 3][moe x 58], GPT-OSS [(sliding, full) x 18], a recompute fraction splits them."""
    out, i, n = [], 0, len(classes)
    while i < n:
        best = (1, 1)
        for period in range(1, max_period + 1):
            pattern = classes[i:i + period]
            if len(pattern) < period:
                break
            repeats = 1
            while classes[i + repeats * period:i + (repeats + 1) * period] == pattern:
                repeats += 1
            if repeats >= 2 and period * repeats > best[0] * best[1]:
                best = (period, repeats)
        period, repeats = best
        out.append(Segment(i, tuple(classes[i:i + period]), repeats))
        i += period * repeats
    return out


def reduced_layers(segs: list[Segment], repeats: dict[int, int]) -> tuple[list[int], list[tuple]]:
    """Layer indices keeping `repeats[k]` copies of segment k's pattern (its first ones), and each
    kept layer's moment key: (segment, position in the pattern, role) with role 'first', 'last',
    'interior' or 'only' by the copy's place among the kept copies. A layer's neighbours, and so
    its FSDP prefetch and reduce-scatter context, are fixed by its key."""
    indices, keys = [], []
    for k, seg in enumerate(segs):
        kept = repeats.get(k, seg.repeats)
        for copy in range(kept):
            role = "only" if kept == 1 else "first" if copy == 0 else "last" if copy == kept - 1 else "interior"
            for q in range(len(seg.pattern)):
                indices.append(seg.start + copy * len(seg.pattern) + q)
                keys.append((k, q, role))
    return indices, keys


def build_fake_model(config, indices: list[int] | None, fake_mode) -> nn.Module:
    """The runtime's CausalLM on fake CPU tensors (fp32 master weights, values never computed).

    `indices`: keep only these decoder layers (built with their original index, so kind, attention
    type and layer-dependent details are those of the full model)."""
    from xplan.runtime.models import CausalLM
    from xplan.runtime.models.transformer import DecoderLayer

    with torch.device("meta"):
        if indices is None:
            model = CausalLM(config)
        else:
            model = CausalLM(dataclasses.replace(config, num_layers=0))
            model.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in indices)
            model.config = config
    with fake_mode:
        model.materialize("cpu")
    return model


# --------------------------------------------------------------------------------------------------
# One measured run


@dataclass
class _Measured:
    # (phase, (block kind, recompute policy) of the running decoder layer, or None) -> peak then
    moments: dict[tuple[str, Any], PhasePeak]
    micro_batches: int
    timings: dict[str, float]


def _measure(plan, config, indices: list[int] | None, classes: list[tuple[str, str]], keys: list,
             imbalance: float, chunk_tokens: int) -> _Measured:
    """One dry run. `indices`: the decoder layers kept (None: all); `classes`: (kind, policy) of
    each layer that runs (reduced depth: the full model's policy is put back on every kept block);
    `keys`: each running layer's moment key (peaks are kept per phase and key)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from xplan.runtime import distributed as D
    from xplan.runtime.recompute import apply_recompute
    from xplan.runtime.train.loss import token_loss_sum
    from xplan.runtime.train.optim import build_optimizer, build_scheduler
    from xplan.runtime.train.parallel import apply_kernels

    layout, training = plan.layout, plan.training
    grad_accum = layout.grad_accum(training.global_batch)
    micro = min(grad_accum, 2)
    tracker_cls = _make_tracker_class()
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    with fake_process_group(layout.devices, rank=0):
        meshes = D.build_meshes(layout, "cpu")
        fake = FakeTensorMode(allow_non_fake_inputs=True)  # meshes hold real rank tables
        with _skip_sharding_propagation(), _lazy_fsdp_chunks():
            model = build_fake_model(config, indices, fake)
            with fake:
                apply_kernels(model, layout)
                lap("build")
                model = D.parallelize(model, layout, meshes, expert_imbalance=imbalance)
                lap("parallelize")
                if indices is not None:  # reduced depth: each kept block has its full-model policy
                    for block, (_, policy) in zip(model.model.layers, classes, strict=True):
                        apply_recompute(block, policy)
                model.train()
                optimizer = build_optimizer(model, training.optimizer)
                scheduler = build_scheduler(optimizer, training.schedule, training.steps)
                # Warm-up: AdamW states exist from the first step on.
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lap("warm-up")

                rows, cols = layout.micro_batch, training.seq_len // layout.sp
                input_ids = torch.zeros(rows, cols, dtype=torch.long)
                labels = torch.zeros(rows, cols, dtype=torch.long)
                positions = (torch.arange(cols) + meshes.sp_rank * cols).expand(rows, cols)
            tokens_per_step = training.global_batch * training.seq_len
            kind = layout.kernels.get("loss", "chunked")
            defer_sync = layout.fsdp == 1 and grad_accum > 1 and hasattr(model, "set_requires_gradient_sync")
            tracker = tracker_cls(model, optimizer, model.lm_head)
            tracker.track_inputs((input_ids, labels, positions))
            with fake, tracker:
                tracker.stage = "step"
                for index in range(micro):
                    tracker.reset_mod_stats()
                    if defer_sync:
                        model.set_requires_gradient_sync(index == micro - 1)  # reduce after the last one
                    loss = token_loss_sum(model, input_ids, labels, positions, kind, chunk_tokens)
                    lap("forward")
                    (loss / tokens_per_step).backward()
                    del loss
                    tracker.label_accumulated_grads()
                    lap("backward")
                tracker.stage = "optimizer"
                D.clip_grad_norm_(model, training.grad_clip, meshes)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                lap("optimizer")
            peaks = dict(tracker.peaks)
    moments: dict[tuple[str, Any], PhasePeak] = {}
    for (phase, block), peak in peaks.items():
        key = (phase, keys[block] if block is not None else None)
        if indices is not None and block is not None:  # name the layer's class, not a reduced model's index
            (kind, policy), (_, _, role) = classes[block], keys[block]
            peak.where = _LAYER.sub(f".layers[{kind}, recompute {policy}, {role} of its run].", peak.where).rstrip(".")
        if key not in moments or peak.bytes > moments[key].bytes:
            moments[key] = peak
    return _Measured(moments, micro, timings)


def _summarise(moments: dict[tuple[str, Any], PhasePeak]):
    """(overall peak, its phase, phase -> peak) from the per-moment peaks."""
    phases: dict[str, PhasePeak] = {}
    for (phase, _), peak in moments.items():
        if phase not in phases or peak.bytes > phases[phase].bytes:
            phases[phase] = peak
    top = max(phases, key=lambda p: phases[p].bytes)
    return phases[top], top, phases


# --------------------------------------------------------------------------------------------------
# Public entry point


def dry_run(plan, layers: int | None = None, imbalance: float | None = None, reprice: bool = False,
            chunk_tokens: int | None = None) -> DryRunReport:
    """Run the plan's training step at full world size and model size under fake tensors.

    `plan`: a loaded `xplan.plan.Plan`. `layers`: None runs every decoder layer; an integer
    runs that many (and one more) layers of each (block kind, recompute policy) class and
    extrapolates linearly. `imbalance`: busiest EP rank's routed load over the mean (default: the
    plan's `predictions.imbalance`, else 1). `reprice`: ignore the plan's recorded predictions and
    price the layout now. Raises InputError for plans the runtime cannot execute.
    """
    from xplan.runtime.train.loop import check_plan_for_runtime
    from xplan.runtime.train.loss import DEFAULT_CHUNK_TOKENS

    start = time.perf_counter()
    config = check_plan_for_runtime(plan)
    layout, training = plan.layout, plan.training
    if layout.devices < 1:
        raise InputError(f"devices must be positive, got {layout.devices}.")
    if imbalance is None:
        imbalance = float((plan.data.predictions or {}).get("imbalance", 1.0) or 1.0)
    if imbalance < 1.0:
        raise InputError(f"imbalance is the busiest rank's routed load over the mean and must be >= 1, got {imbalance}.")
    if layers is not None and layers < 3:
        raise InputError(f"--layers is the number of copies of each repeated block pattern to run and must be at "
                         f"least 3 (a first, an interior and a last copy), got {layers}.")
    chunk_tokens = chunk_tokens or DEFAULT_CHUNK_TOKENS
    grad_accum = layout.grad_accum(training.global_batch)
    predicted, predicted_total, source = predicted_components(plan, imbalance, reprice)
    notes = []
    if layout.offload:
        notes.append(f"offload ({', '.join(layout.offload)}) is not simulated: fake tensors live on one device, so "
                     "the measured peak counts offloaded bytes on the device.")
    if predicted.get("overhead"):
        notes.append(f"the predicted overhead ({predicted['overhead'] / GIB:.2f} GiB: the caching allocator's "
                     "fragmentation) is not measurable under fake tensors and is left out of the compared peak.")

    classes = layer_classes(config, layout)
    segs = segments(classes)
    if layers is None or all(seg.repeats <= layers + 1 for seg in segs):
        _, keys = reduced_layers(segs, {})
        measured = _measure(plan, config, None, classes, keys, imbalance, chunk_tokens)
        moments, micro, layers_run, extrapolated = measured.moments, measured.micro_batches, config.num_layers, False
        timings = measured.timings
    else:
        moments, micro, layers_run, timings = _extrapolate(plan, config, classes, segs, layers, imbalance,
                                                           chunk_tokens)
        extrapolated = True
        notes.append(f"ran {layers_run} of {config.num_layers} layers ({layers} or {layers + 1} copies of each "
                     "repeated block pattern) and extrapolated each moment linearly in the copies.")
    peak, phase, by_phase = _summarise(moments)
    categories = {k: float(v) for k, v in peak.categories.items()}
    phases = {p: {"peak_bytes": float(v.bytes), "where": v.where,
                  "components": components_of({k: float(b) for k, b in v.categories.items()})}
              for p, v in by_phase.items()}
    peak_bytes, where = float(peak.bytes), peak.where
    measured_components = components_of(categories)
    return DryRunReport(
        model=plan.model, hardware=plan.hardware, layout=layout.to_dict(), seq_len=training.seq_len,
        global_batch=training.global_batch, grad_accum=grad_accum, micro_batches_run=micro,
        world_size=layout.devices, rank=0, imbalance=imbalance, measured_peak_bytes=peak_bytes,
        measured=measured_components, peak_phase=phase, peak_where=where, phases=phases, categories=categories,
        predicted=predicted, predicted_total_bytes=predicted_total, predicted_source=source,
        layers_total=config.num_layers, layers_run=layers_run,
        extrapolated=extrapolated, elapsed_s=time.perf_counter() - start, timings_s=timings, notes=notes,
    )


def _extrapolate(plan, config, classes, segs: list[Segment], layers: int, imbalance, chunk_tokens):
    """Reduced-depth runs, each moment extrapolated linearly, then the maximum.

    Every segment of repeated blocks longer than `layers + 1` copies runs with `layers` copies, and
    with `layers + 1` in one extra run per such segment. A moment (phase, layer key) holds the same
    blocks' contributions in every run (its neighbours are fixed, `reduced_layers`): model states,
    saved activations and accumulated gradients grow linearly with each segment's copies, and the
    position of the largest moment among interior copies moves with them linearly, so the moment is
    exact at full depth. The maximum over moments is not linear (which block peaks can change
    with depth), which is why it is taken last. `layers` >= 3 so interior copies exist.
    """
    long = [k for k, seg in enumerate(segs) if seg.repeats > layers + 1]
    base = {k: layers for k in long}

    def run(repeats):
        indices, keys = reduced_layers(segs, repeats)
        kept = [classes[i] for i in indices]
        return _measure(plan, config, indices, kept, keys, imbalance, chunk_tokens), len(indices)

    ref, layers_run = run(base)
    extra = {k: run({**base, k: layers + 1})[0] for k in long}

    def linear(get):
        value = get(ref)
        for k, m in extra.items():
            value += (segs[k].repeats - layers) * (get(m) - get(ref))
        return value

    moments = {}
    for key, peak in ref.moments.items():
        if not all(key in m.moments for m in extra.values()):
            continue
        cats = set(peak.categories).union(*(m.moments[key].categories for m in extra.values()))
        moments[key] = PhasePeak(
            bytes=linear(lambda m, key=key: m.moments[key].bytes),
            categories={k: linear(lambda m, key=key, k=k: m.moments[key].categories.get(k, 0)) for k in cats},
            where=peak.where,
        )
    timings: dict[str, float] = {}
    for m in (ref, *extra.values()):
        for k, v in m.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return moments, ref.micro_batches, layers_run, timings


__all__ = ["COMPONENTS", "DryRunReport", "Segment", "components_of", "dry_run", "fake_process_group",
           "layer_classes", "predicted_components", "reduced_layers", "segments"]
