"""Where a run starts: the checkpoint `--resume` continues from (verified, with fallback), the
refusal to mix a fresh run into another run's directory, and the metrics file cut back to the
resumed step."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from xplan.errors import InputError

from . import checkpoint as ckpt
from . import manifest


@dataclass
class ResumePoint:
    path: str  # the checkpoint directory the run continues from
    step: int
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that did not verify, and why
    plan_changes: list[str] = field(default_factory=list)  # training settings the plan changed


def choose(checkpoint_dir: str | None, fingerprint: str, training: dict[str, Any],
           accept_plan_changes: bool) -> ResumePoint:
    """The newest checkpoint that verifies, of this model; InputError when there is none, or when
    the plan changed training settings and `accept_plan_changes` is off."""
    step, path, saved, skipped = ckpt.require_checkpoint(Path(checkpoint_dir) if checkpoint_dir else None,
                                                         fingerprint)
    changes = manifest.training_differences(saved.get("training") or training, training)
    if changes and not accept_plan_changes:
        raise InputError(f"the plan's training settings differ from checkpoint {path}'s: {'; '.join(changes)}. "
                         "Resume with the plan the run started with, or pass --accept-plan-changes to continue "
                         "with the plan's values.")
    return ResumePoint(str(path), step, skipped, changes)


def agree(point: ResumePoint | None, error: str | None, is_main: bool, world_size: int) -> ResumePoint:
    """Every rank continues from rank 0's choice (only rank 0 reads and verifies the files); an
    error found there is raised on every rank."""
    payload = [{"point": point, "error": error} if is_main else None]
    if world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(payload, src=0)
    if payload[0]["error"]:
        raise InputError(payload[0]["error"])
    return payload[0]["point"]


def prepare_directory(checkpoint_dir: str | None, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """A fresh run does not write into another run's checkpoints: exit 2 unless --resume, or
    --overwrite, which removes them first (where `remove`: one rank of a torchrun job)."""
    if not checkpoint_dir or resume:
        return
    root = Path(checkpoint_dir)
    earlier = [path for _, path in manifest.step_dirs(root)]
    if (root / ckpt.HF_DIR).exists():
        earlier.append(root / ckpt.HF_DIR)
    if not earlier:
        return
    if not overwrite:
        raise InputError(f"{root} already holds another run's checkpoints ({', '.join(p.name for p in earlier[:3])}"
                         f"{' ...' if len(earlier) > 3 else ''}); pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --checkpoint-dir.")
    for path in earlier + list(root.glob(".tmp-*")) if remove else ():
        shutil.rmtree(path, ignore_errors=True)


def truncate_metrics(path: str | None, last_step: int) -> None:
    """Drop metric records past `last_step` (steps a crashed run logged after its last checkpoint),
    so a resumed run's file has each step once."""
    if not path or not Path(path).is_file():
        return
    kept = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from the crash
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
