"""Checked JSON entries in the cache directory (traces, model configs, parameter counts).

One entry is one file, `<cache dir>/<kind>/<key>.json`: a header line, then the payload as JSON
text. The header holds the format, the entry's key and the SHA-256 of the payload bytes. Reading
checks all three before parsing, so a truncated, bit-flipped, swapped or garbage file is a miss
(None), never an exception and never another entry's data; callers then validate the payload's
shape themselves. Files are written atomically (temporary file + rename); an unwritable cache
directory only disables caching.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

STORE_FORMAT = 2  # 1 was the pickled trace cache
MAX_ENTRY_BYTES = 256 * 2**20  # far above any real entry: a bigger file is damaged, not read


def default_cache_dir() -> Path:
    env = os.environ.get("XPLAN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "xplan"


def entry_path(cache_dir: str | Path | None, kind: str, key: str) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / kind / f"{key}.json"


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} in a cache entry")


def read_entry(cache_dir: str | Path | None, kind: str, key: str) -> Any | None:
    """The payload stored under `key`, or None when absent, unreadable or not intact."""
    path = entry_path(cache_dir, kind, key)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENTRY_BYTES + 1)
        if len(data) > MAX_ENTRY_BYTES:
            return None
        header_line, sep, payload = data.partition(b"\n")
        header = json.loads(header_line)
        if (not sep or type(header) is not dict or header.get("format") != STORE_FORMAT
                or header.get("key") != key or header.get("sha256") != hashlib.sha256(payload).hexdigest()):
            return None
        return json.loads(payload, parse_constant=_reject_constant)
    except Exception:  # noqa: BLE001 - any damage (bad UTF-8, bad JSON, MemoryError, RecursionError) is a miss
        return None


def write_entry(cache_dir: str | Path | None, kind: str, key: str, payload: Any) -> Path | None:
    """Store `payload` (JSON types only, finite numbers) under `key`; the path, or None if the
    payload is not plain JSON or the directory is not writable."""
    try:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        return None
    header = json.dumps({"format": STORE_FORMAT, "key": key, "sha256": hashlib.sha256(body).hexdigest()})
    path = entry_path(cache_dir, kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header.encode() + b"\n" + body)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return None
    return path
