"""`xplan run --dry-run`: the runtime's own training step at full scale on one CPU, memory tracked.

What runs (the same code as `xplan run`, only the tensors and the process group are fake):
1. a fake process group (backend ``"fake"``, `compat.fake_store`) at the plan's world size, this
   process being rank 0, and the plan's meshes (`build_meshes`);
2. the model built on meta and materialised under `FakeTensorMode` (no memory, no compute), the
   plan's kernels (`apply_kernels`) and `parallelize` (EP → Ulysses → recompute → FSDP2 with the
   plan's mixed precision), the plan's AdamW (`build_optimizer`) and LR schedule;
3. warm-up: one optimizer step on zero gradients so the AdamW states exist (a real run's steady
   state), then the measured step: `train_step` (the train loop's own) over ``min(grad_accum, 2)``
   micro-batches of the plan's ``micro_batch`` sequences (this rank's ``seq_len / sp`` chunk). A
   second micro-batch is what makes accumulated gradients resident during a forward, as in every
   micro-batch after the first of a real step; later micro-batches repeat its peak.

Memory is tracked by `tracker.DryRunMemTracker`. While the dry run builds FSDP2 units,
`compat.lazy_fsdp_chunks` makes only the chunks FSDP2 reads (creating all world-size chunks of
every parameter under fake tensors was half the run time).

Which rank: every rank runs the same shapes under fake tensors; rank 0 holds the largest FSDP shards
(FSDP2 pads the last ranks' shards) and the expert-parallel receive side is the busiest rank's
(even split × the routing imbalance, see `runtime.distributed.expert_parallel`), so rank 0's peak is
the per-rank peak of the largest rank.

Offload is simulated: the runtime's offload code runs (synchronously on this CPU), and the tracker counts
its host copies (and, with ``offload: params``, FSDP2's sharded states) as host memory, reported
beside the device peak. Not simulated: allocator rounding and fragmentation, the CUDA/NCCL
context, and the host<->device copies' timing.

Full depth is the default: it takes about a minute (DeepSeek-V3, 2 cores); `layers=` runs a few
copies of each repeated block pattern and extrapolates (`depth`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from xplan.errors import InputError

from .. import compat
from .depth import extrapolate, layer_classes, needs_extrapolation, reduced_layers, segments
from .report import GIB, DryRunReport
from .tracker import (
    LAYER,
    PARAMS_OFFLOAD_HOST,
    Measured,
    PhasePeak,
    components_of,
    host_components_of,
    tracker_class,
)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """A fake default process group (no communication) for the duration of the block."""
    import torch.distributed as dist

    from xplan.runtime.distributed.mesh import clear_mesh_cache

    if dist.is_initialized():
        raise RuntimeError("a dry run needs its own (fake) default process group, but one is already initialised "
                           "in this process; run the dry run in a fresh process.")
    clear_mesh_cache()
    dist.init_process_group("fake", store=compat.fake_store(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        clear_mesh_cache()
        dist.destroy_process_group()


def build_fake_model(config, indices: list[int] | None, fake_mode) -> nn.Module:
    """The runtime's CausalLM on fake CPU tensors (fp32 master weights, values never computed).

    `indices`: keep only these decoder layers (built with their original index, so kind, attention
    type and layer-dependent details are those of the full model)."""
    from xplan.runtime.models.transformer import DecoderLayer, model_class

    with torch.device("meta"):
        if indices is None:
            model = model_class(config)(config)
        else:
            model = model_class(config)(dataclasses.replace(config, num_layers=0))
            model.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in indices)
            model.config = config
    with fake_mode:
        model.materialize("cpu")
    return model


class _TrackedStep:
    """`StepHooks` for the measured step: per-micro-batch module stats, accumulated gradients
    labelled as gradient state, the optimizer stage, and where the time went."""

    def __init__(self, tracker, timings: dict[str, float]):
        self.tracker, self.timings, self.clock = tracker, timings, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.clock
        self.clock = now

    def micro_batch_start(self, index: int) -> None:
        self.tracker.reset_mod_stats()

    def forward_done(self, index: int) -> None:
        self.lap("forward")

    def backward_done(self, index: int) -> None:
        self.tracker.label_accumulated_grads()
        self.lap("backward")

    def optimizer_start(self) -> None:
        self.tracker.stage = "optimizer"

    def optimizer_done(self) -> None:
        self.lap("optimizer")


def measure(plan, config, indices: list[int] | None, classes: list[tuple[str, str]], keys: list,
            imbalance: float, chunk_tokens: int) -> Measured:
    """One dry run. `indices`: the decoder layers kept (None: all); `classes`: (kind, policy) of
    each layer that runs (reduced depth: the full model's policy is put back on every kept block);
    `keys`: each running layer's moment key (peaks are kept per phase and key)."""
    from xplan.runtime import distributed as D
    from xplan.runtime.recompute import apply_recompute
    from xplan.runtime.train.data import Batch
    from xplan.runtime.train.optim import build_optimizer, build_scheduler
    from xplan.runtime.train.parallel import apply_kernels
    from xplan.runtime.train.step import token_loss_fn, train_step

    layout, training = plan.layout, plan.training
    micro = min(layout.grad_accum(training.global_batch), 2)
    timings: dict[str, float] = {}
    hooks = _TrackedStep(None, timings)
    # The tracker exists from the measured step on; copies made before (warm-up) are labelled then.
    activation_labels = D.OffloadLabels(host=lambda t: hooks.tracker and hooks.tracker.label_host(t),
                                        restored=lambda t: hooks.tracker and hooks.tracker.label_restored(t))
    state_labels = D.OffloadLabels(host=lambda t: hooks.tracker and hooks.tracker.label_host_states(t))

    with fake_process_group(layout.ranks, rank=0):
        meshes = D.build_meshes(layout, "cpu")
        fake = compat.fake_tensor_mode(allow_non_fake_inputs=True)  # meshes hold real rank tables
        with compat.skip_sharding_propagation(), compat.lazy_fsdp_chunks():
            model = build_fake_model(config, indices, fake)
            with fake:
                apply_kernels(model, layout)
                hooks.lap("build")
                model = D.parallelize(model, layout, meshes, expert_imbalance=imbalance,
                                      fp8_recipe=training.fp8_recipe, offload_labels=activation_labels)
                hooks.lap("parallelize")
                if indices is not None:  # reduced depth: each kept block has its full-model policy
                    for block, (_, policy) in zip(model.model.layers, classes, strict=True):
                        apply_recompute(block, policy)
                model.train()
                optimizer = build_optimizer(model, training.optimizer)
                state_offload = D.apply_optimizer_offload(optimizer, layout, "cpu", labels=state_labels)
                scheduler = build_scheduler(optimizer, training.schedule, training.steps)
                # Warm-up: AdamW states exist from the first step on (ZeRO-1: on its shards).
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                hooks.lap("warm-up")

                rows, cols = layout.micro_batch, training.seq_len // layout.sp
                input_ids = torch.zeros(rows, cols, dtype=torch.long)
                labels = torch.zeros(rows, cols, dtype=torch.long)
                positions = (torch.arange(cols) + meshes.sp_rank * cols).expand(rows, cols)
                pixels = None
                if training.image_tokens:  # the runtime's image + text samples (images first)
                    from xplan.runtime.train.data import image_batch, image_share

                    # Every sample carries images whatever training.image_fraction is: the heaviest
                    # micro-batch, which the planner's memory prediction prices (text-only samples,
                    # priced in compute at the fraction, only ever make a micro-batch lighter).

                    # rank 0 holds chunk 0 of each sequence (its placeholders first) and, with sp > 1,
                    # its 1/sp share of the micro-batch's images
                    input_ids, pixels = image_batch(input_ids, config.vision_spec, training.image_tokens)
                    pixels = pixels[image_share(pixels.shape[0], meshes.sp_rank, layout.sp)]
            loss_fn = token_loss_fn(layout.kernels.get("loss", "chunked"), chunk_tokens)
            # Where the runtime keeps model states in host memory: FSDP2's CPU offload (params) keeps
            # the shards, gradients and moments there; ZeRO-1 with offload its fp32 masters and moments.
            zero1_host = layout.zero1 and any(k in layout.offload for k in ("optimizer", "params"))
            host_categories = ("OptState",) if zero1_host else PARAMS_OFFLOAD_HOST if "params" in layout.offload else ()
            hooks.tracker = tracker = tracker_class()(model, optimizer, model.lm_head, host_categories, zero1_host)
            tracker.track_inputs(tuple(t for t in (input_ids, labels, positions, pixels) if t is not None))
            for host in (state_offload.host.values() if state_offload is not None else ()):
                tracker.label_host_states(host)
            with fake, tracker:
                tracker.stage = "step"
                train_step(model, optimizer, [Batch(input_ids, labels, positions, pixels)] * micro, loss_fn,
                           training.global_batch * training.seq_len, meshes, training.grad_clip, scheduler,
                           hooks=hooks)
            peaks = dict(tracker.peaks)
    moments: dict[tuple[str, Any], PhasePeak] = {}
    for (phase, block), peak in peaks.items():
        key = (phase, keys[block] if block is not None else None)
        if indices is not None and block is not None:  # name the layer's class, not a reduced model's index
            (kind, policy), (_, _, role) = classes[block], keys[block]
            peak.where = LAYER.sub(f".layers[{kind}, recompute {policy}, {role} of its run].", peak.where).rstrip(".")
        if key not in moments or peak.bytes > moments[key].bytes:
            moments[key] = peak
    return Measured(moments, micro, timings)


def _summarise(moments: dict[tuple[str, Any], PhasePeak]):
    """(overall peak, its phase, phase -> peak) from the per-moment peaks."""
    phases: dict[str, PhasePeak] = {}
    for (phase, _), peak in moments.items():
        if phase not in phases or peak.bytes > phases[phase].bytes:
            phases[phase] = peak
    top = max(phases, key=lambda p: phases[p].bytes)
    return phases[top], top, phases


def check_dry_run(plan, layers: int | None = None, imbalance: float | None = None):
    """(model config, imbalance) for a dry run of `plan`; raises InputError for plans the runtime
    cannot execute and for bad options. `imbalance` defaults to the plan's
    `predictions.imbalance`, else 1."""
    from xplan.runtime.train.loop import check_plan_for_runtime

    config = check_plan_for_runtime(plan, check_positions=False)
    if plan.layout.devices < 1:
        raise InputError(f"devices must be positive, got {plan.layout.devices}.")  # a plan file guarantees it
    if imbalance is None:
        imbalance = float((plan.data.predictions or {}).get("imbalance", 1.0) or 1.0)
    if imbalance < 1.0:
        raise InputError(f"imbalance is the busiest rank's routed load over the mean and must be >= 1, got {imbalance}.")
    if layers is not None and layers < 3:
        raise InputError(f"--layers is the number of copies of each repeated block pattern to run and must be at "
                         f"least 3 (a first, an interior and a last copy), got {layers}.")
    return config, imbalance


def executed_layout(layout):
    """The layout as a dry run executes it: the plan's, except that `kernels.elementwise: fused`
    runs eager. Blocks are compiled only on accelerators (`train.parallel.compile_blocks`); on CPU
    fake tensors they stay eager and RMSNorm is the torch one (`kernels.registry.STAND_IN`), so the
    activations a dry run measures are what eager ops save, not what compiled blocks keep."""
    if layout.kernels.get("elementwise", "fused") != "fused":
        return layout
    return layout.with_changes(kernels={**layout.kernels.model_dump(), "elementwise": "eager"})


def rank_memory_budget(hardware: str, ranks_per_device: int) -> float | None:
    """Device memory one rank may use, in bytes: the profile's per-device HBM over its ranks (an a3
    package's 128 GiB is two 64 GiB dies). None when the profile cannot be read."""
    from xplan.hw_profiles import load_profile

    try:
        profile = load_profile(hardware)
    except InputError:
        return None
    return profile.memory.hbm_gib * GIB / ranks_per_device


def dry_run(plan, layers: int | None = None, imbalance: float | None = None,
            chunk_tokens: int | None = None) -> DryRunReport:
    """Run the plan's training step at full world size and model size under fake tensors.

    `plan`: a loaded `xplan.plan.Plan`. `layers`: None runs every decoder layer; an integer
    runs that many (and one more) layers of each (block kind, recompute policy) class and
    extrapolates linearly. `imbalance`: busiest EP rank's routed load over the mean (default: the
    plan's `predictions.imbalance`, else 1). Raises InputError for plans the runtime cannot execute.
    """
    from xplan.runtime.train.loss import DEFAULT_CHUNK_TOKENS

    start = time.perf_counter()
    config, imbalance = check_dry_run(plan, layers, imbalance)
    layout, training = plan.layout, plan.training
    chunk_tokens = chunk_tokens or DEFAULT_CHUNK_TOKENS
    caveats, run_notes = [], []
    if training.seq_len > config.max_position_embeddings:
        caveats.append(f"seq_len {training.seq_len} exceeds the model's max_position_embeddings "
                       f"({config.max_position_embeddings}): `xplan run` refuses it until the model's config extends "
                       "its positions (e.g. YaRN rope scaling); memory does not depend on it.")
    if layout.offload:
        run_notes.append(f"offload ({', '.join(layout.offload)}) simulated: the runtime's host copies are counted as "
                         "host memory, not on the device; the copies' timing is not.")
    if executed_layout(layout) is not layout:
        caveats.append("kernels.elementwise=fused compiles each block on the accelerator; here the blocks run eager "
                       "(no torch.compile on CPU fake tensors), so activations are measured as eager ops save them, "
                       "not as compiled blocks keep them (fewer: pointwise ops recomputed).")

    classes = layer_classes(config, layout)
    segs = segments(classes)

    def measure_layers(indices: list[int], keys: list[tuple]) -> Measured:
        return measure(plan, config, indices, [classes[i] for i in indices], keys, imbalance, chunk_tokens)

    if not needs_extrapolation(segs, layers):
        _, keys = reduced_layers(segs, {})
        measured = measure(plan, config, None, classes, keys, imbalance, chunk_tokens)
        layers_run, extrapolated = config.num_layers, False
    else:
        measured, layers_run = extrapolate(segs, layers, measure_layers)
        extrapolated = True
        run_notes.append(f"ran {layers_run} of {config.num_layers} layers ({layers} or {layers + 1} copies of each "
                         "repeated block pattern) and extrapolated each moment linearly in the copies.")
    peak, phase, by_phase = _summarise(measured.moments)
    host_peak = max(measured.moments.values(), key=lambda p: p.host_bytes)
    categories = {k: float(v) for k, v in peak.categories.items()}
    phases = {p: {"peak_bytes": float(v.bytes), "where": v.where,
                  "components": components_of({k: float(b) for k, b in v.categories.items()})}
              for p, v in by_phase.items()}
    return DryRunReport(
        model=plan.model, hardware=plan.hardware, layout=layout.to_dict(), seq_len=training.seq_len,
        global_batch=training.global_batch, grad_accum=layout.grad_accum(training.global_batch),
        micro_batches_run=measured.micro_batches, world_size=layout.ranks, devices=layout.devices,
        ranks_per_device=layout.ranks_per_device, rank_budget_bytes=rank_memory_budget(plan.hardware,
                                                                                       layout.ranks_per_device),
        rank=0, imbalance=imbalance,
        measured_peak_bytes=float(peak.bytes), measured=components_of(categories), peak_phase=phase,
        peak_where=peak.where, phases=phases, categories=categories, layers_total=config.num_layers,
        layers_run=layers_run, extrapolated=extrapolated, elapsed_s=time.perf_counter() - start,
        timings_s=measured.timings, caveats=caveats, run_notes=run_notes,
        measured_host_bytes=float(host_peak.host_bytes),
        host=host_components_of({k: float(v) for k, v in host_peak.host.items()}),
    )


__all__ = ["build_fake_model", "check_dry_run", "dry_run", "executed_layout", "fake_process_group", "measure"]
