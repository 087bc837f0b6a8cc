"""Checkpoints: sharded (torch.distributed.checkpoint) for exact resume, and a Hugging Face
safetensors export of the full model.

Layout of a checkpoint directory::

    <dir>/step_00000010/      one complete checkpoint per saved step
        .metadata, __*_*.distcp   DCP shards: model and optimizer state (each rank writes its own)
        trainer.pt              step, LR scheduler, data position, world size (rank 0)
        rng_rank{r}.pt          python / torch / accelerator RNG states of rank r
    <dir>/hf/                 full model in Hugging Face layout (config.json + safetensors)

Atomicity: every rank writes into ``<dir>/.tmp-step_N``; after a barrier rank 0 renames it to
``step_N`` (a rename within one directory is atomic on POSIX), so a ``step_*`` directory is always
complete and a crash leaves at most a ``.tmp-*`` directory, which is ignored and cleared by the next
save. The HF export is written the same way (``.tmp-hf`` then rename).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from xplan.errors import InputError

STEP_RE = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.pt"
HF_DIR = "hf"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_RE.match(child.name)
        if match and child.is_dir() and (child / TRAINER_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def require_checkpoint(root: Path | None) -> tuple[int, Path]:
    """The checkpoint --resume starts from; InputError when there is none."""
    if root is None:
        raise InputError("--resume needs --checkpoint-dir: the directory the earlier run saved checkpoints in.")
    found = latest_checkpoint(root)
    if found is None:
        raise InputError(f"--resume: no complete checkpoint in {root} (expected step_NNNNNNNN/ directories "
                         "written by `xplan run --checkpoint-dir`); run without --resume to start fresh.")
    return found


def _rng_state(device_type: str) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    mod = getattr(torch, device_type, None) if device_type in ("cuda", "npu") else None
    if mod is not None:
        state[device_type] = mod.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device_type: str) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    mod = getattr(torch, device_type, None) if device_type in ("cuda", "npu") else None
    if mod is not None and device_type in state:
        mod.set_rng_state(state[device_type])


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, trainer_state: dict[str, Any], rank: int, world_size: int,
                    device_type: str = "cpu") -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(world_size)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(device_type), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({**trainer_state, "step": step, "world_size": world_size,
                    "scheduler": scheduler.state_dict()}, tmp / TRAINER_FILE)
    _barrier(world_size)
    if rank == 0:
        _fsync_dir(tmp)
        _replace_dir(tmp, final)  # saving the same step again (e.g. a rerun) swaps atomically
        _fsync_dir(root)
    _barrier(world_size)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int,
                    world_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    path = Path(path)
    trainer = torch.load(path / TRAINER_FILE, weights_only=False)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file() and trainer.get("world_size") == world_size:
        _set_rng_state(torch.load(rng, weights_only=False), device_type)
    return trainer


def export_hf(model: nn.Module, directory: Path, rank: int, world_size: int) -> Path:
    """Gather the full model and write it in Hugging Face layout (rank 0 writes; collective)."""
    from xplan.runtime.models import CausalLM
    from xplan.runtime.models.hf_io import save_hf

    directory = Path(directory)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with torch.device("meta"):
            host = CausalLM(model.config)
        host.materialize("cpu")
        host.load_state_dict({k: v for k, v in full.items()}, strict=False)
        missing = [k for k in host.state_dict() if k not in full]
        if missing:
            raise RuntimeError(f"full state dict lacks {missing[:5]}: the parallelized model renamed parameters")
        tmp = directory.parent / f".tmp-{directory.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(host, tmp)
        _replace_dir(tmp, directory)
    _barrier(world_size)
    return directory


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` directory to `final`; an existing `final` is swapped out first, so
    a reader sees either the old or the new directory, never a partial one."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".tmp-old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
