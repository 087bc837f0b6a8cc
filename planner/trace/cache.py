"""On-disk cache of traces, keyed by (model config, seq len, micro-batch, recompute policy, dtype,
loss kernel, token tiles, code version).

The code version hashes the source of the tracer, the recompute policies, the training loss and
the runtime's model zoo (plus the torch version, whose dispatch decides which ops run), so editing
any of them invalidates every cached trace. It is computed from the files and package metadata,
without importing torch or the runtime, so a cache hit needs neither. Entries are checked JSON
(store.py, codec in model_trace.py): a damaged or stale entry is a miss.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from functools import lru_cache
from importlib import util
from pathlib import Path
from typing import Any

from . import store
from .model_trace import ModelTrace, same_trace, trace_from_json, trace_to_json
from .store import default_cache_dir

KIND = "traces"


@lru_cache(maxsize=8)
def package_version(name: str) -> str:
    """An installed distribution's version, read from its dist-info folder name next to the package
    (importing importlib.metadata costs more than a warm CLI's whole budget for it)."""
    spec = util.find_spec(name)
    if spec is None:
        return "absent"
    if spec.origin:
        site = Path(spec.origin).parent.parent
        found = sorted(site.glob(f"{name.replace('-', '_')}-*.dist-info"))
        if len(found) == 1:
            return found[0].name.removesuffix(".dist-info").split("-", 1)[1]
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def runtime_dir() -> Path:
    """The runtime package's folder, found without running its code (only `xplan` is imported)."""
    spec = util.find_spec("xplan.runtime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("xplan.runtime is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _source_files() -> list[Path]:
    here = Path(__file__).resolve().parent
    runtime = runtime_dir()
    files = sorted(here.glob("*.py"))
    files += sorted((runtime / "models").glob("*.py"))
    files += [runtime / "recompute.py", runtime / "train" / "loss.py"]
    return files


@lru_cache(maxsize=1)
def _version_cached(stamp: tuple) -> str:
    h = hashlib.sha256(f"format={store.STORE_FORMAT};torch={package_version('torch')}".encode())
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


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def cache_key(config, seq_len: int, micro_batch: int, recompute: str, dtype: Any, loss: str = "full",
              tiles: int = 1, image_tokens: int = 0) -> str:
    tiled = f"-t{tiles}" if tiles > 1 else ""  # untiled keys as before token tiling existed
    images = f"-i{image_tokens}" if image_tokens else ""
    return (f"{config.family}-{config_hash(config)}-s{seq_len}-b{micro_batch}-{recompute}-{dtype_name(dtype)}-{loss}"
            f"{images}{tiled}-{code_version()}")


def entry_path(cache_dir: str | Path | None, key: str) -> Path:
    return store.entry_path(cache_dir, KIND, key)


def load(cache_dir: str | Path | None, key: str) -> ModelTrace | None:
    """The cached trace, or None when absent, damaged, malformed or stale."""
    # Decoding allocates tens of thousands of containers (none cyclic): with the collector on,
    # a process already holding a large heap (torch after a cold trace) pays full collections.
    collecting = gc.isenabled()
    gc.disable()
    try:
        data = store.read_entry(cache_dir, KIND, key)
        return None if data is None else trace_from_json(data)
    except Exception:  # noqa: BLE001 - a payload of the wrong shape is a miss, whatever it trips over
        return None
    finally:
        if collecting:
            gc.enable()


def store_trace(cache_dir: str | Path | None, key: str, trace: ModelTrace) -> Path | None:
    """Write `trace` unless its JSON form would not read back as the same trace."""
    data = trace_to_json(trace)
    try:
        if not same_trace(trace_from_json(json.loads(json.dumps(data, allow_nan=False))), trace):
            return None
    except (ValueError, TypeError, KeyError):
        return None
    return store.write_entry(cache_dir, KIND, key, data)


__all__ = ["cache_key", "code_version", "config_hash", "default_cache_dir", "entry_path", "load", "store_trace"]
