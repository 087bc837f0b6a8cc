"""Model configs and parameter counts kept in the cache, so a warm CLI imports neither transformers
nor torch.

`load_model_config(ref)` parses a preset or config.json once with transformers' defaults
(`xplan.runtime.models.config.model_config_from_dict`) and keeps the `ModelConfig` as a checked
JSON entry keyed by the file's content, the model's name, the transformers version and the
parser's source. `parameter_counts(config)` counts the runtime's model on meta once per (config,
trace code version) and keeps the counts the same way. Entries that do not read back exactly are
never written; damaged ones are misses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import sys
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

from xplan.runtime.models import config as model_config
from xplan.runtime.models.parameter_counts import ParameterCounts

from . import store
from .cache import code_version, config_hash, package_version

CONFIG_KIND, COUNTS_KIND = "configs", "param_counts"
INT_LIMIT = 2**63


@lru_cache(maxsize=1)
def _parser_version() -> str:
    """The transformers version (its defaults fill the config) and the source of the parser and
    its checks (runtime/models/config*.py: a stricter check must see configs parsed before it)."""
    h = hashlib.sha256(f"transformers={package_version('transformers')};".encode())
    for path in sorted(Path(model_config.__file__).parent.glob("config*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(model_config.ModelConfig)


def _config_key(raw: Any, name: str) -> str:
    h = hashlib.sha256(json.dumps([raw, name], sort_keys=True).encode())
    h.update(_parser_version().encode())
    return h.hexdigest()[:32]


def _exact_to_json(value: Any, depth: int = 0) -> Any:
    """JSON for a config.json-like value that reads back equal: containers are tagged ({"L": list},
    {"T": tuple}, {"D": [[key, value], ...]}) so tuples and integer keys (id2label) survive."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if depth > 8:
        raise TypeError("config value nested too deeply")
    if type(value) in (list, tuple):
        return {"L" if type(value) is list else "T": [_exact_to_json(v, depth + 1) for v in value]}
    if type(value) is dict:
        return {"D": [[_exact_to_json(k, depth + 1), _exact_to_json(v, depth + 1)] for k, v in value.items()]}
    raise TypeError(f"config value of type {type(value).__name__} has no JSON form")


def _exact_from_json(data: Any, depth: int = 0) -> Any:
    if data is None or type(data) in (bool, int, str):
        if type(data) is int and not -INT_LIMIT < data < INT_LIMIT:
            raise ValueError("malformed config entry: integer out of range")
        return data
    if type(data) is float:
        if abs(data) == float("inf"):
            raise ValueError("malformed config entry: non-finite number")
        return data
    if depth > 8 or type(data) is not dict or len(data) != 1:
        raise ValueError("malformed config entry")
    (tag, items), = data.items()
    if type(items) is not list:
        raise ValueError("malformed config entry")
    if tag == "L":
        return [_exact_from_json(v, depth + 1) for v in items]
    if tag == "T":
        return tuple(_exact_from_json(v, depth + 1) for v in items)
    if tag == "D" and all(type(kv) is list and len(kv) == 2 for kv in items):
        out = {}
        for k, v in items:
            key = _exact_from_json(k, depth + 1)
            if type(key) not in (str, int, float, bool) and key is not None:
                raise ValueError("malformed config entry: key")
            out[key] = _exact_from_json(v, depth + 1)
        return out
    raise ValueError("malformed config entry")


def _config_to_json(config: model_config.ModelConfig) -> dict:
    return {f.name: _exact_to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _check(value: Any, annotation: Any) -> bool:
    """Whether a JSON-decoded value has the type a ModelConfig field annotation names."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_check(value, a) for a in args)
    if annotation is bool:
        return type(value) is bool
    if annotation is int:
        return type(value) is int and -INT_LIMIT < value < INT_LIMIT
    if annotation is float:
        return type(value) is float
    if annotation is str:
        return type(value) is str
    if origin is tuple:
        return type(value) is tuple and all(_check(v, args[0]) for v in value)
    if origin is dict:
        return type(value) is dict and all(_check(k, args[0]) for k in value)
    return False


def _config_from_json(data: Any) -> model_config.ModelConfig:
    hints = _field_types()
    fields = dataclasses.fields(model_config.ModelConfig)
    if type(data) is not dict or set(data) != {f.name for f in fields}:
        raise ValueError("malformed config entry")
    values = {}
    for f in fields:
        value = _exact_from_json(data[f.name])
        if not _check(value, hints[f.name]):
            raise ValueError(f"malformed config entry: {f.name}")
        values[f.name] = value
    return model_config.ModelConfig(**values)


def _same_config(a, b) -> bool:
    return a == b and a.hf_dict == b.hf_dict


def load_model_config(name_or_path: str | Path) -> model_config.ModelConfig:
    """`xplan.runtime.models.load_config`, from the cache when this exact file was parsed before.

    What the parse printed on stderr (the checks' warnings about unknown keys) is kept with the
    entry and printed again on every hit, so a warm run says what a cold one says.
    """
    raw, name = model_config.read_config_json(name_or_path)
    key = _config_key(raw, name)
    entry = store.read_entry(None, CONFIG_KIND, key)
    if type(entry) is dict and set(entry) == {"config", "stderr"} and type(entry["stderr"]) is str:
        try:
            config = _config_from_json(entry["config"])
        except Exception:  # noqa: BLE001 - a payload of the wrong shape is a miss
            pass
        else:
            sys.stderr.write(entry["stderr"])
            return config
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            config = model_config.model_config_from_dict(raw, name=name)
    finally:
        sys.stderr.write(printed.getvalue())
    try:
        data = _config_to_json(config)
        if _same_config(_config_from_json(json.loads(json.dumps(data, allow_nan=False))), config):
            store.write_entry(None, CONFIG_KIND, key, {"config": data, "stderr": printed.getvalue()})
    except (TypeError, ValueError):
        pass  # no exact JSON form: parsed every time
    return config



def _counts_from_json(data: Any) -> ParameterCounts:
    ints = ("total", "active", "routed_experts", "vision")
    if (type(data) is not dict or set(data) != {*ints, "layers_by_kind"}
            or not all(type(data[k]) is int and 0 <= data[k] < INT_LIMIT for k in ints)
            or type(data["layers_by_kind"]) is not dict
            or not all(type(k) is str and type(v) is int and 0 < v < INT_LIMIT
                       for k, v in data["layers_by_kind"].items())):
        raise ValueError("malformed parameter-count entry")
    return ParameterCounts(**{k: data[k] for k in ints}, layers_by_kind=dict(data["layers_by_kind"]))


def parameter_counts(config: model_config.ModelConfig) -> ParameterCounts:
    """Total / active / routed-expert parameters and layers by kind of the runtime's model."""
    key = f"{config.family}-{config_hash(config)}-{code_version()}"
    data = store.read_entry(None, COUNTS_KIND, key)
    if data is not None:
        try:
            return _counts_from_json(data)
        except ValueError:
            pass
    from xplan.runtime import build_model
    from xplan.runtime.models.counting import count_parameters

    counts = count_parameters(build_model(config, device="meta"))
    out = ParameterCounts(counts.total, counts.active, counts.routed_experts, dict(counts.layers_by_kind),
                          counts.vision)
    store.write_entry(None, COUNTS_KIND, key, dataclasses.asdict(out))
    return out
