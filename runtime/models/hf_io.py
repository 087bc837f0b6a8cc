"""Hugging Face safetensors interop: load a checkpoint into xplan's modules and write one back.

Parameters and persistent buffers map one-to-one by name, except in modules that define
`hf_keys_to_local(prefix, tensors)` / `local_to_hf(prefix)` (stacked experts convert their own
per-expert keys). Files: `model.safetensors`, or shards listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from xplan.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(directory: Path) -> list[Path]:
    """Safetensors files of a checkpoint directory ([] when it holds none)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise InputError(f"{index} is not a valid safetensors index: {exc}") from exc
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    return sorted(directory.glob("*.safetensors"))


def _hooked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if hasattr(module, "hf_keys_to_local"):
            yield (name + "." if name else ""), module


def _extra_layer_key(key: str, num_layers: int) -> bool:
    """Keys of layers beyond the model, e.g. DeepSeek-V3's multi-token-prediction layer 61."""
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return bool(match) and int(match.group(1)) >= num_layers


def load_hf_weights(model: nn.Module, directory: Path, num_layers: int) -> int:
    """Copy every tensor of the checkpoint into `model` (already materialised). Returns the count."""
    files = checkpoint_files(directory)
    # Models whose local names differ from the checkpoint's by prefix (vision-language models).
    rename = getattr(model, "hf_key_to_local", lambda key: key)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for hf_key in handle.keys():
                    key = rename(hf_key)
                    if not _extra_layer_key(key, num_layers):
                        tensors[key] = handle.get_tensor(hf_key)
        except (OSError, RuntimeError) as exc:
            raise InputError(f"cannot read safetensors file {path}: {exc}") from exc

    local: dict[str, torch.Tensor] = {}
    for prefix, module in _hooked_modules(model):
        local.update(module.hf_keys_to_local(prefix, tensors))  # consumes its keys from `tensors`
    local.update(tensors)

    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in local and not k.endswith("inv_freq")]
    if "lm_head.weight" in missing and getattr(model, "config", None) and model.config.tie_word_embeddings:
        missing.remove("lm_head.weight")
    unexpected = [k for k in local if k not in expected]
    if missing or unexpected:
        raise InputError(
            f"checkpoint in {directory} does not match the model built from its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    with torch.no_grad():
        for key, value in local.items():
            target = expected[key]
            if tuple(target.shape) != tuple(value.shape):
                raise InputError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model expects "
                                 f"{tuple(target.shape)}.")
            target.copy_(value.to(target.dtype))
    return len(local)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face checkpoint names (contiguous, on CPU)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    for prefix, module in _hooked_modules(model):
        for name in list(state):
            if name.startswith(prefix) and name[len(prefix):] in dict(module.named_parameters(recurse=False)) | dict(
                module.named_buffers(recurse=False)
            ):
                del state[name]
        state.update(module.local_to_hf(prefix))
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    rename = getattr(model, "local_key_to_hf", lambda key: key)
    return {rename(k): v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_hf(model: nn.Module, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`).

    Files are written to a temporary name and renamed, so a crash never leaves a torn checkpoint.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards, strict=True):
        _atomic_write(out / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
        _atomic_write(out / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    config = dict(model.config.hf_dict)
    config["model_type"] = model.config.model_type
    _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
