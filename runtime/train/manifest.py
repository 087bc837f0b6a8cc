"""What makes a checkpoint directory trustworthy data: state files that carry no code, and a
manifest written last that names every file with its size and SHA-256.

- Trainer state is JSON (`trainer.json`); RNG states are safetensors tensors plus JSON for the
  Python / NumPy generator tuples (`rng_rank{r}.safetensors`). Nothing is unpickled from a
  checkpoint except DCP's own `.metadata`, which torch.distributed.checkpoint requires; it is
  verified against the manifest before DCP reads it (checkpoints must still come from trusted
  directories: a manifest can be forged along with the files it lists).
- `manifest.json`: step, world size, the model's fingerprint, the training settings the run used,
  and `files` {name: {size, sha256}}. A directory without one (a crash during the save, or a
  checkpoint from an older xplan that pickled its state) is never loaded.
- `verify` re-reads every listed file; `select_checkpoint` walks the checkpoints newest first and
  returns the first that verifies, with a note for each one it skipped and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xplan.errors import InputError

FORMAT = 1
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
MAX_JSON_BYTES = 64 * 2**20  # a manifest or trainer state larger than this is not one of ours
_CHUNK = 8 * 2**20


def model_fingerprint(config) -> str:
    """Hash of the model's architecture fields (its name excluded): a checkpoint of another model
    cannot be resumed into this one."""
    fields = dataclasses.asdict(config)
    fields.pop("name", None)
    fields.pop("hf_dict", None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def read_json(path: Path, what: str) -> Any:
    """A JSON file of ours; anything unreadable, oversized or malformed is a ValueError naming it."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{what} {path} is larger than {MAX_JSON_BYTES // 2**20} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{what} {path} is unreadable: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------- RNG and trainer state
def save_rng(path: Path, device_type: str) -> None:
    """This rank's Python, NumPy, torch and accelerator generator states, as data."""
    tensors = {"torch": torch.get_rng_state()}
    mod = getattr(torch, device_type, None) if device_type in ("cuda", "npu") else None
    if mod is not None:
        tensors[device_type] = mod.get_rng_state().cpu()
    meta = {"python": json.dumps(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        meta["numpy"] = json.dumps([kind, int(pos), int(has_gauss), float(cached)])
    except ImportError:  # pragma: no cover
        pass
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path, device_type: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        python = json.loads(meta["python"])
        random.setstate((python[0], tuple(python[1]), python[2]))
        torch.set_rng_state(f.get_tensor("torch"))
        if "numpy" in meta and "numpy_keys" in names:
            import numpy as np

            kind, pos, has_gauss, cached = json.loads(meta["numpy"])
            keys = f.get_tensor("numpy_keys").numpy().astype(np.uint32)
            np.random.set_state((kind, keys, pos, has_gauss, cached))
        mod = getattr(torch, device_type, None) if device_type in ("cuda", "npu") else None
        if mod is not None and device_type in names:
            mod.set_rng_state(f.get_tensor(device_type))


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- manifest
def write_manifest(directory: Path, step: int, world_size: int, fingerprint: str, training: dict[str, Any],
                   files: dict[str, dict[str, Any]]) -> None:
    write_json(directory / MANIFEST, {"format": FORMAT, "step": step, "world_size": world_size,
                                      "model": fingerprint, "training": training, "files": files})


def verify(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when every listed file is present with its size and checksum, else
    (None, why not)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        legacy = (directory / "trainer.pt").is_file()
        return None, ("written by an older xplan that pickled its state (not loaded: checkpoints are data)"
                      if legacy else "no manifest (the save did not finish)")
    try:
        manifest = read_json(directory / MANIFEST, "manifest")
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            return None, "manifest of an unknown format"
        int(manifest["step"]), int(manifest["world_size"]), str(manifest["model"])
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"manifest unreadable ({exc})"
    for name, expected in sorted(files.items()):
        path = directory / name
        if "/" in name or name.startswith(".."):
            return None, f"manifest names a file outside the checkpoint: {name!r}"
        if not path.is_file():
            return None, f"{name} is missing"
        try:
            actual = file_digest(path)
        except OSError as exc:
            return None, f"{name} is unreadable ({exc.strerror or exc})"
        if actual["size"] != expected.get("size"):
            return None, f"{name} has {actual['size']} bytes, the manifest says {expected.get('size')} (truncated?)"
        if actual["sha256"] != expected.get("sha256"):
            return None, f"{name} does not match its checksum (corrupted)"
    return manifest, None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step_NNNNNNNN directory under `root`, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in root.iterdir()
             if (m := STEP_RE.match(child.name)) and child.is_dir()]
    return sorted(found)


def select_checkpoint(root: Path, fingerprint: str | None = None) -> tuple[int, Path, dict[str, Any], list[str]]:
    """The newest checkpoint that verifies: (step, directory, manifest, notes on the newer ones
    skipped). InputError when none verifies, or when the newest verified one is of another
    model (`fingerprint`)."""
    notes = []
    for step, directory in reversed(step_dirs(root)):
        manifest, problem = verify(directory)
        if problem:
            notes.append(f"skipped {directory.name}: {problem}")
            continue
        if fingerprint is not None and manifest["model"] != fingerprint:
            raise InputError(f"checkpoint {directory} is of a different model (fingerprint {manifest['model']}, "
                             f"this plan's model {fingerprint}); resume with the plan that wrote it, or use a "
                             "fresh --checkpoint-dir.")
        return step, directory, manifest, notes
    detail = f" ({'; '.join(notes)})" if notes else ""
    raise InputError(f"--resume: no complete checkpoint that verifies in {root}{detail}; run without --resume to "
                     "start fresh.")


def training_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Training settings (dotted keys) whose value in the plan differs from the checkpoint's;
    `steps` is left out (extending a run is what --steps is for)."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    a, b = flat(saved), flat(now)
    return [f"{k}: checkpoint {a.get(k)!r}, plan {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k != "steps" and a.get(k) != b.get(k)]
