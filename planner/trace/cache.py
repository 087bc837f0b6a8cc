"""On-disk cache of traces, keyed by (model config, seq len, micro-batch, recompute policy, dtype,
loss kernel, code version).

The code version hashes the source of the tracer, the recompute policies, the training loss and
the runtime's model zoo (plus the torch version, whose dispatch decides which ops run), so editing any of them
invalidates every cached trace. Entries are pickles written atomically; an unreadable or stale
entry is treated as a miss, and an unwritable cache directory only disables caching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def default_cache_dir() -> Path:
    env = os.environ.get("XPLAN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "xplan"


def _source_files() -> list[Path]:
    import xplan.runtime.models as models
    import xplan.runtime.recompute as recompute
    import xplan.runtime.train.loss as loss

    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py"))
    files += sorted(Path(models.__file__).resolve().parent.glob("*.py"))
    files += [Path(recompute.__file__).resolve(), Path(loss.__file__).resolve()]
    return files


@lru_cache(maxsize=1)
def _version_cached(stamp: tuple) -> str:
    h = hashlib.sha256(f"format={FORMAT};torch={torch.__version__}".encode())
    for path, _, _ in stamp:
        h.update(path.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def code_version() -> str:
    """Hash of the tracer, recompute and model-zoo sources (re-read when a file changes)."""
    stamp = []
    for p in _source_files():
        st = p.stat()
        stamp.append((str(p), st.st_mtime_ns, st.st_size))
    return _version_cached(tuple(stamp))


def config_hash(config) -> str:
    fields = dataclasses.asdict(config)
    fields.pop("name", None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(config, seq_len: int, micro_batch: int, recompute: str, dtype: torch.dtype, loss: str = "full") -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"{config.family}-{config_hash(config)}-s{seq_len}-b{micro_batch}-{recompute}-{dtype_name}-{loss}"
            f"-{code_version()}")


def entry_path(cache_dir: str | Path | None, key: str) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / "traces" / f"{key}.pkl"


def load(cache_dir: str | Path | None, key: str) -> Any | None:
    path = entry_path(cache_dir, key)
    try:
        with open(path, "rb") as f:
            stored_key, value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError):
        return None
    return value if stored_key == key else None


def store(cache_dir: str | Path | None, key: str, value: Any) -> Path | None:
    path = entry_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pkl")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump((key, value), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return None
    return path
