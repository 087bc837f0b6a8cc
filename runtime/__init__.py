"""xplan runtime: executes a plan. Models, parallelisms, kernels, train loop, checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from .models import CausalLM, ModelConfig, load_config
from .models.hf_io import checkpoint_files, load_hf_weights, save_hf


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0) -> CausalLM:
    """A randomly initialised model (seeded), or an unallocated one when device is 'meta'."""
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    if str(device) != "meta":
        model.materialize(device)
        model.init_weights(seed)
    return model


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> CausalLM:
    """Build the model named by a preset or a config directory; load its safetensors if present.

    Without weights the model is randomly initialised from `seed`; on device 'meta' nothing is
    allocated (for counting and tracing).
    """
    config = load_config(name_or_path)
    path = Path(str(name_or_path))
    files = checkpoint_files(path) if path.is_dir() else []
    if str(device) == "meta" or not files:
        return build_model(config, dtype, device, seed)
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    model.materialize(device)
    load_hf_weights(model, path, config.num_layers)
    return model


__all__ = ["CausalLM", "ModelConfig", "build_model", "load_config", "load_model", "save_hf"]
