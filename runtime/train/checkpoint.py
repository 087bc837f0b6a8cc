"""Checkpoints: sharded (torch.distributed.checkpoint) for exact resume, and a Hugging Face
safetensors export of the full model.

Layout of a checkpoint directory::

    <dir>/step_00000010/      one complete checkpoint per saved step
        .metadata, __*_*.distcp   DCP shards: model and optimizer state (each rank writes its own)
        trainer.json            step, LR-schedule position, data position, world size (rank 0)
        rng_rank{r}.safetensors python / numpy / torch / accelerator RNG states of rank r
        manifest.json           written last: every file's size and SHA-256, the model's fingerprint
                                and the training settings (see manifest.py)
    <dir>/hf/                 full model in Hugging Face layout (config.json + safetensors)

Model and optimizer state are the `get_state_dict` form (parameter names → sharded DTensors); under
ZeRO-1 the fp32 master shards and their AdamW states take the parameters' place with the same names
and global shapes, so DCP reshards between world sizes and data-parallel modes.

Atomicity: every rank writes into ``<dir>/.tmp-step_N``; after a barrier rank 0 writes the
manifest and renames the directory to ``step_N`` (a rename within one directory is atomic on
POSIX), so a crash leaves at most a ``.tmp-*`` directory, which is ignored and cleared by the next
save. Resume verifies the manifest and falls back to the newest checkpoint that verifies. The HF
export is written the same way (``.tmp-hf`` then rename).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from xplan.errors import InputError
from xplan.runtime.distributed import zero1_of

from . import manifest

HF_DIR = "hf"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Checkpoints under `root` whose save finished (a manifest was written), oldest first; see
    manifest.select_checkpoint for the ones that also verify."""
    return [(step, path) for step, path in manifest.step_dirs(root) if (path / manifest.MANIFEST).is_file()]


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def require_checkpoint(root: Path | None, fingerprint: str | None = None) -> tuple[int, Path, dict, list[str]]:
    """The checkpoint --resume starts from (the newest that verifies) with notes on the ones
    skipped; InputError when there is none."""
    if root is None:
        raise InputError("--resume needs --checkpoint-dir: the directory the earlier run saved checkpoints in.")
    return manifest.select_checkpoint(Path(root), fingerprint)


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _own_files(directory: Path, rank: int) -> list[Path]:
    """The files `rank` wrote into a checkpoint directory (DCP names shards __{rank}_{i}.distcp)."""
    mine = list(directory.glob(f"__{rank}_*.distcp")) + [directory / f"rng_rank{rank}.safetensors"]
    if rank == 0:
        mine += [directory / ".metadata", directory / manifest.TRAINER_FILE]
    return [p for p in mine if p.is_file()]


def _storage_error(exc: BaseException | None) -> OSError | None:
    """The OSError (disk full, quota, permissions) behind a failed save, if any; DCP wraps each
    rank's failure in a CheckpointException (`failures`: rank -> exception)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS,
                                                      errno.EPERM):
            return exc
        for inner in (getattr(exc, "failures", None) or {}).values():
            found = _storage_error(inner[0] if isinstance(inner, tuple) else inner)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None


def _first_failure(exc: CheckpointException) -> str:
    for failure in exc.failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(inner).__name__}: {inner}"
    return str(exc)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    zero = zero1_of(model)
    return zero.state_dicts(optimizer) if zero is not None else get_state_dict(model, optimizer)


def resident_states(optimizer: torch.optim.Optimizer):
    """Moments kept in host memory between steps (`offload: optimizer`) come back for a checkpoint."""
    offload = getattr(optimizer, "_xplan_state_offload", None)
    return offload.resident() if offload is not None else contextlib.nullcontext()


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, trainer_state: dict[str, Any], rank: int, world_size: int,
                    device_type: str = "cpu", fingerprint: str = "", training: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. A save that fails for lack of
    space or permission removes its partial directory and says so, naming the path."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier(world_size)
        with resident_states(optimizer):
            model_sd, optim_sd = _state_dicts(model, optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        manifest.save_rng(tmp / f"rng_rank{rank}.safetensors", device_type)
        if rank == 0:
            # The schedule's shape and base LR are the plan's; the checkpoint keeps its position.
            schedule = {k: v for k, v in scheduler.state_dict().items() if k not in ("lr_lambdas", "base_lrs")}
            manifest.write_json(tmp / manifest.TRAINER_FILE,
                                {**trainer_state, "step": step, "world_size": world_size, "scheduler": schedule})
        _barrier(world_size)
        digests = {p.name: manifest.file_digest(p) for p in _own_files(tmp, rank)}
        if world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, digests)
            digests = {k: v for part in gathered for k, v in part.items()}
        if rank == 0:
            for path in tmp.iterdir():  # anything no rank claimed is hashed here
                if path.is_file() and path.name not in digests:
                    digests[path.name] = manifest.file_digest(path)
            manifest.write_manifest(tmp, step, world_size, fingerprint, training or {}, digests)
            _fsync_dir(tmp)
            _replace_dir(tmp, final)  # saving the same step again (e.g. a rerun) swaps atomically
            _fsync_dir(root)
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        storage = _storage_error(exc)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if storage is None and isinstance(exc, CheckpointException):
            raise RuntimeError(f"saving the checkpoint of step {step} under {root} failed: "
                               f"{_first_failure(exc)}; the partial save was removed.") from None
        if storage is None:
            raise
        reason = "the disk is full" if storage.errno in (errno.ENOSPC, errno.EDQUOT) else storage.strerror
        raise RuntimeError(f"saving the checkpoint of step {step} under {root} failed: {reason} "
                           f"({storage.filename or tmp}); the partial save was removed. Free space or choose "
                           "another --checkpoint-dir, then --resume from the last complete checkpoint.") from None
    _barrier(world_size)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int,
                    world_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """Collective. Restores model, optimizer, the schedule's position and this rank's RNG (same
    world size only); returns the trainer state. The directory must have verified first."""
    path = Path(path)
    trainer = manifest.read_json(path / manifest.TRAINER_FILE, "trainer state")
    with resident_states(optimizer):
        model_sd, optim_sd = _state_dicts(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        zero = zero1_of(model)
        if zero is not None:
            zero.load_state_dicts(optimizer, state["model"], state["optimizer"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **trainer["scheduler"]})
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)  # the plan's LR at the resumed position
    rng = path / f"rng_rank{rank}.safetensors"
    if rng.is_file() and trainer.get("world_size") == world_size:
        manifest.load_rng(rng, device_type)
    return trainer


def export_hf(model: nn.Module, directory: Path, rank: int, world_size: int) -> Path:
    """Gather the full model and write it in Hugging Face layout (rank 0 writes; collective).

    The gathered state goes into a fresh model of the trained model's own class (`model_class`: a
    vision-language model keeps its vision tower and projector) strictly: a tensor the fresh model
    lacks, or one the gathered state lacks, stops the export with nothing written."""
    from xplan.runtime.models.hf_io import save_hf

    directory = Path(directory)
    zero = zero1_of(model)
    if zero is not None:  # the fp32 masters, not the compute-dtype replicas
        full = zero.full_model_state_dict()
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        host = host_model(model.config, full)
        tmp = directory.parent / f".tmp-{directory.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(host, tmp)
        _replace_dir(tmp, directory)
    _barrier(world_size)
    return directory


def host_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of `config`'s class on the host holding `state`, which must name exactly its
    tensors (RuntimeError otherwise: a renamed or dropped tensor is a bug, never skipped)."""
    from xplan.runtime.models.transformer import model_class

    with torch.device("meta"):
        host = model_class(config)(config)
    host.materialize("cpu")
    expected = host.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise RuntimeError(f"the trained state does not match a fresh {type(host).__name__} of {config.name}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]} (the parallelized model renamed or "
                           "dropped tensors); nothing was exported.")
    host.load_state_dict(state, strict=True)  # shapes are checked here
    return host


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
