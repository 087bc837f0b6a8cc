"""The train loop: executes a plan on this process's rank.

Per optimizer step: this rank's micro-batches of the step's global batch through `step.train_step`
(forward and backward per micro-batch, gradient clipping on the global norm, AdamW and the LR
schedule). The logged loss is the global mean (one all-reduce). Checkpoints every
`checkpoint_every` steps and at the end of the run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xplan.errors import InputError
from xplan.layout_check import image_refusals
from xplan.runtime.distributed import apply_optimizer_offload

from ..distributed.expert_parallel import step_imbalance
from ..precision import precision_executed
from . import checkpoint as ckpt
from . import manifest, peers, resume
from .data import build_data, step_tokens
from .metrics import (
    MetricsLog,
    memory_kind,
    peak_memory_gib,
    peak_reserved_gib,
    reset_peak_memory,
    summarize,
    synchronize,
)
from .optim import build_optimizer, build_scheduler
from .parallel import Context, all_reduce_max, barrier, micro_batches, parallelize, setup, teardown
from .step import token_loss_fn, train_step

SHARE_TOLERANCE = 0.05  # image_jsonl: a file's share of image samples this far from the plan's is warned about


@dataclass
class RunOptions:
    """What `xplan run` adds to the plan (picklable: it crosses into spawned workers)."""

    steps: int | None = None  # total optimizer steps to reach (default: the plan's)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end of the run
    resume: bool = False
    device_type: str = "cpu"
    metrics_path: str | None = None
    live: bool = True  # rich live table on rank 0
    timeout_s: float = 300.0
    export_hf: bool = True  # write <checkpoint_dir>/hf at the end
    loss_chunk_tokens: int = 1024
    overwrite: bool = False  # a fresh run may replace another run's checkpoints in checkpoint_dir
    accept_plan_changes: bool = False  # resume with training settings that differ from the checkpoint's
    max_nonfinite_skips: int = 0  # steps with non-finite gradients skipped before the run stops
    resume_point: Any = None  # chosen before spawning (resume.ResumePoint): workers need not re-verify


def load_run_plan(plan_path: str | Path):
    from xplan.plan import load_plan

    return load_plan(plan_path)


def check_plan_for_runtime(plan, device_type: str | None = None, check_positions: bool = True) -> Any:
    """Checks that need the model config (and what the runtime executes on `device_type`);
    returns the config. Raises InputError. `check_positions`: refuse a seq_len beyond the model's
    max_position_embeddings (the dry run measures memory, which does not depend on it)."""
    from xplan.runtime import load_config
    from xplan.runtime.distributed import check_runtime_layout

    config = load_config(plan.model)
    check_ranks_per_device(plan)
    check_runtime_layout(plan.layout, config, plan.training.seq_len, plan.training.global_batch,
                         device_type=device_type)
    check_vision_runtime(plan, config)
    if check_positions and plan.training.seq_len > config.max_position_embeddings:
        raise InputError(f"seq_len {plan.training.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings}).")
    return config


def check_vision_runtime(plan, config) -> None:
    """Image + text batches: the image tokens fit the model, the layout runs them
    (`xplan.layout_check.image_refusals`) and the data holds images."""
    from xplan.runtime.models.vlm_config import check_image_tokens

    image_tokens, fraction = plan.training.image_tokens, plan.training.image_fraction
    check_image_tokens(config, image_tokens, plan.training.seq_len)
    if fraction < 1 and not image_tokens:
        raise InputError(f"training.image_fraction {fraction:g} is the share of samples that carry images, but "
                         "training.image_tokens is 0 (no sample carries any); set training.image_tokens (the image "
                         "tokens of an image sample) or leave image_fraction at 1.")
    tokens_per_image = config.vision_spec.tokens_per_image if config.is_vlm else 1
    refusals = image_refusals(plan.layout, image_tokens, fraction, tokens_per_image)
    if refusals:
        raise InputError(refusals[0] + ".")
    kind = plan.training.data.kind
    if kind == "image_jsonl" and not config.is_vlm:
        raise InputError(f"training.data.kind 'image_jsonl' holds images, but {config.name} ({config.model_type}) "
                         "is not a vision-language model; use `jsonl` or `text` data.")
    if kind == "image_jsonl" and not image_tokens:
        per_image = config.vision_spec.tokens_per_image
        raise InputError(f"training.data.kind 'image_jsonl' needs training.image_tokens: the image tokens per "
                         f"sample, {per_image} per image for {config.name} (e.g. {per_image} for one image).")
    if image_tokens and kind not in ("synthetic", "image_jsonl"):
        raise InputError(f"image tokens run on synthetic data (random images) or image_jsonl samples, not "
                         f"{kind!r} (text only); set training.data.kind: synthetic or image_jsonl.")


def log_image_share(share: float, fraction: float, source: str) -> None:
    """image_jsonl: the file's share of image samples against the plan's image_fraction (which the
    planner priced the vision tower's compute at)."""
    log = logging.getLogger("xplan.runtime")
    log.info("%s: %.3f of the samples carry images (the plan's training.image_fraction: %g)", source, share, fraction)
    if abs(share - fraction) > SHARE_TOLERANCE:
        log.warning("the data's share of image samples (%.3f) differs from training.image_fraction (%g), at which "
                    "the plan priced the vision tower's compute; set image_fraction to %.2f for a faithful "
                    "prediction.", share, fraction, share)


def check_ranks_per_device(plan) -> None:
    """The plan's ranks per device must be its hardware's: a plan priced with one rank per 910C
    package cannot run on a3, where each die is its own rank."""
    from xplan.hw_profiles import load_profile

    try:
        profile = load_profile(plan.hardware)
    except InputError:
        return  # a profile this machine cannot read: the plan's own count stands
    expected = profile.device.ranks_per_device
    layout = plan.layout
    if layout.ranks_per_device != expected:
        raise InputError(
            f"hardware {plan.hardware!r} runs {expected} rank(s) per device ({profile.device.definition}) but the "
            f"plan has ranks_per_device {layout.ranks_per_device}: its layout is sized for "
            f"{layout.ranks} ranks, not {layout.devices * expected}. Set `ranks_per_device: {expected}` at the "
            "plan's top level and size fsdp, ep, sp and micro_batch in ranks (docs/plan-schema.md, devices and "
            "ranks).")


def train(plan, options: RunOptions, plan_dir: Path | None = None) -> dict[str, Any] | None:
    """Run the plan on this rank. Returns the run summary on rank 0 (None on other ranks)."""
    from xplan.runtime import load_model

    config = check_plan_for_runtime(plan, options.device_type)
    training = plan.training
    layout = plan.layout
    ctx = setup(layout, options.device_type, options.timeout_s)
    where = {"step": 0}  # the step this rank is in (1-based), for a failed collective's message
    try:
        summary = _train(plan, options, plan_dir, config, training, layout, ctx, load_model, where)
        barrier(ctx)  # no rank tears its process groups down while a peer still talks to it
        return summary
    except Exception as exc:
        failure = peers.explain(exc, ctx.rank, ctx.world_size, where["step"], options.timeout_s)
        if failure is None:
            raise
        raise failure from None
    finally:
        teardown(ctx)


def _train(plan, options, plan_dir, config, training, layout, ctx: Context, load_model,
           where: dict[str, int]) -> dict[str, Any] | None:
    target_steps = options.steps if options.steps is not None else training.steps
    if target_steps < 1:
        raise InputError(f"--steps must be at least 1, got {target_steps}.")
    fingerprint = manifest.model_fingerprint(config)
    training_settings = training.model_dump(mode="json")
    resume_from = None
    if options.resume:
        point, error = options.resume_point, None
        if ctx.is_main and point is None:
            try:
                point = resume.choose(options.checkpoint_dir, fingerprint, training_settings,
                                      options.accept_plan_changes)
            except InputError as exc:
                error = str(exc)
        resume_from = resume.agree(point, error, ctx.is_main, ctx.world_size)

    source = build_data(training.data, config.vocab_size, training.seq_len, plan_dir, training.image_tokens,
                        config.vision_spec if training.image_tokens else None, training.image_fraction)
    if ctx.is_main and hasattr(source, "image_share"):
        log_image_share(source.image_share(), training.image_fraction, source.describe())
    torch.manual_seed(training.seed)
    model = load_model(plan.model, dtype=torch.float32, device=ctx.device, seed=training.seed)
    model = parallelize(model, layout, ctx, training.fp8_recipe)
    model.train()
    optimizer = build_optimizer(model, training.optimizer)
    apply_optimizer_offload(optimizer, layout, ctx.device_type)
    scheduler = build_scheduler(optimizer, training.schedule, training.steps)

    start = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(Path(resume_from.path), model, optimizer, scheduler, ctx.rank,
                                     ctx.world_size, ctx.device_type)
        start = int(state["step"])
        if state.get("global_batch", training.global_batch) != training.global_batch or \
                state.get("seq_len", training.seq_len) != training.seq_len:
            raise InputError(f"checkpoint {resume_from.path} was written with global batch {state.get('global_batch')}"
                             f" and seq_len {state.get('seq_len')}; the plan now has {training.global_batch} and "
                             f"{training.seq_len}. Resume with the plan the run started with.")

    global_batch, seq_len = training.global_batch, training.seq_len
    # every packed label is a real token; image placeholders are not predicted (text-only samples have none)
    def step_tokens_of(step: int) -> int:
        return step_tokens(source, step, global_batch, seq_len, training.image_tokens)

    tokens_per_step = step_tokens_of(start)
    trained_tokens: list[int] = []
    memory = memory_kind(ctx.device_type)
    log = None
    if ctx.is_main:
        metrics_path = Path(options.metrics_path) if options.metrics_path else None
        title = (f"xplan run: {config.name} on {ctx.world_size} × {ctx.device_type} ranks "
                 f"(fsdp {layout.fsdp}, ep {layout.ep}, sp {layout.sp}, {layout.precision}), "
                 f"{source.describe()}")
        if resume_from is not None:
            resume.truncate_metrics(options.metrics_path, start)
        log = MetricsLog(metrics_path, append=resume_from is not None, live=options.live, title=title,
                         predictions=plan.data.predictions, memory=memory)
    loss_fn = token_loss_fn(layout.kernels.get("loss", "chunked"), options.loss_chunk_tokens, ctx.device)
    records: list[dict[str, Any]] = []
    skips = 0  # steps whose gradients were not finite (skipped, not applied)
    try:
        for step in range(start, target_steps):
            where["step"] = step + 1
            reset_peak_memory(ctx.device_type)
            synchronize(ctx.device_type)
            t0, c0 = time.perf_counter(), time.process_time()
            batches = micro_batches(source, step, global_batch, layout.micro_batch, ctx)
            tokens_per_step = step_tokens_of(step)
            trained_tokens.append(tokens_per_step)
            # padded samples (image_jsonl) label fewer tokens: the loss is the mean over those labelled
            labelled = source.step_label_tokens(step, global_batch) if hasattr(source, "step_label_tokens") \
                else tokens_per_step
            result = train_step(model, optimizer, batches, loss_fn, labelled, ctx.meshes,
                                training.grad_clip, scheduler, skip_nonfinite=True)
            loss = result.global_loss(ctx.meshes)
            if result.skipped or not math.isfinite(loss):
                skips += 1
                if skips > options.max_nonfinite_skips:
                    last = ckpt.latest_checkpoint(Path(options.checkpoint_dir)) if options.checkpoint_dir else None
                    raise RuntimeError(
                        f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({float(result.grad_norm)}); the "
                        f"run stops without saving (last good checkpoint: {last[1] if last else 'none'}). Lower the "
                        "learning rate, check the data, or allow skips with --max-nonfinite-skips.")
            synchronize(ctx.device_type)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = all_reduce_max(peak_memory_gib(ctx.device_type), ctx)
            record = {"step": step + 1, "loss": loss, "grad_norm": float(result.grad_norm), "lr": result.lr,
                      "skipped": result.skipped,
                      "step_time_s": elapsed, "host_cpu_s": cpu,
                      "tokens_per_s_per_device": tokens_per_step / elapsed / layout.devices, "peak_memory_gib": peak,
                      "peak_reserved_gib": peak_reserved_gib(ctx.device_type)}
            imbalance = step_imbalance(model) if layout.ep > 1 else None
            if imbalance is not None:  # busiest EP rank's routed load over the mean (what --imbalance prices)
                record["ep_imbalance"] = imbalance
            records.append(record)
            if log is not None:
                log.log(dict(record))
            done = step + 1
            if options.checkpoint_dir and (done == target_steps or
                                           (options.checkpoint_every and done % options.checkpoint_every == 0)):
                ckpt.save_checkpoint(Path(options.checkpoint_dir), done, model, optimizer, scheduler,
                                     {"global_batch": global_batch, "seq_len": seq_len,
                                      "samples_consumed": done * global_batch},
                                     ctx.rank, ctx.world_size, ctx.device_type, fingerprint, training_settings)
            peers.mark(ctx.rank, done)
    finally:
        if log is not None:
            log.close()
    hf_dir = None
    if options.checkpoint_dir and options.export_hf:
        hf_dir = ckpt.export_hf(model, Path(options.checkpoint_dir) / ckpt.HF_DIR, ctx.rank, ctx.world_size)
    if not ctx.is_main:
        return None
    if trained_tokens:  # mixed image / text batches: steps differ; the summary reports their mean
        tokens_per_step = round(sum(trained_tokens) / len(trained_tokens))
    summary = summarize(records, plan.data.predictions, ctx.world_size, tokens_per_step, memory, layout.devices)
    latest = ckpt.latest_checkpoint(Path(options.checkpoint_dir)) if options.checkpoint_dir else None
    summary.update(
        start_step=start,
        end_step=max(start, target_steps),
        device=ctx.device_type,
        checkpoint=str(latest[1]) if latest else None,
        hf_export=str(hf_dir) if hf_dir else None,
        metrics_file=options.metrics_path,
        resumed_from=resume_from.path if resume_from else None,
        skipped_checkpoints=resume_from.skipped if resume_from else [],
        plan_changes=resume_from.plan_changes if resume_from else [],
        nonfinite_steps_skipped=skips,
        kernels_executed=ctx.kernels_executed,
        precision_executed=precision_executed(model),
        allocator_executed=ctx.allocator,
    )
    return summary
