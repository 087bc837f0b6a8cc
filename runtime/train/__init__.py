"""Train loop, the one training step, data, loss, optimizer, checkpoints and launch: what `xplan run`
executes."""

from __future__ import annotations

from .checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import (
    Batch,
    DataSource,
    PackedTokens,
    SyntheticData,
    build_data,
    rank_windows,
    split_micro_batches,
)
from .launch import device_type_for, run_plan
from .loop import RunOptions, train
from .loss import chunked_linear_cross_entropy, full_cross_entropy, token_loss_sum
from .optim import LRSchedule, build_optimizer, build_scheduler
from .step import StepHooks, StepResult, token_loss_fn, train_step

__all__ = [
    "Batch", "DataSource", "LRSchedule", "PackedTokens", "RunOptions", "StepHooks", "StepResult", "SyntheticData",
    "build_data", "build_optimizer", "build_scheduler", "chunked_linear_cross_entropy", "device_type_for",
    "export_hf", "full_cross_entropy", "latest_checkpoint", "load_checkpoint", "rank_windows", "run_plan",
    "save_checkpoint", "split_micro_batches", "token_loss_fn", "token_loss_sum", "train", "train_step",
]
