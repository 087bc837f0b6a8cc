"""xplan runtime: executes a plan. Models, parallelisms, kernels, train loop, checkpoints.

torch and the model code load on first use (PEP 562 `__getattr__`): the planner reads model
configs (`xplan.runtime.models.config`) without paying for them.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .models import CausalLM, ModelConfig, load_config
    from .models.hf_io import save_hf

# Public name -> module that defines it.
_LAZY = {"CausalLM": ".models.transformer", "ModelConfig": ".models.config", "load_config": ".models.config",
         "save_hf": ".models.hf_io"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(config: ModelConfig, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                seed: int = 0) -> CausalLM:
    """A randomly initialised model (seeded), or an unallocated one when device is 'meta'.
    `dtype` defaults to float32."""
    import torch

    from .models.transformer import model_class

    with torch.device("meta"):
        model = model_class(config)(config).to(torch.float32 if dtype is None else dtype)
    if str(device) != "meta":
        model.materialize(device)
        model.init_weights(seed)
    return model


def load_model(name_or_path: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", seed: int = 0) -> CausalLM:
    """Build the model named by a preset or a config directory; load its safetensors if present.

    Without weights the model is randomly initialised from `seed`; on device 'meta' nothing is
    allocated (for counting and tracing). `dtype` defaults to float32.
    """
    import torch

    from .models.config import load_config
    from .models.hf_io import checkpoint_files, load_hf_weights
    from .models.transformer import model_class

    dtype = torch.float32 if dtype is None else dtype
    config = load_config(name_or_path)
    path = Path(str(name_or_path))
    files = checkpoint_files(path) if path.is_dir() else []
    if str(device) == "meta" or not files:
        return build_model(config, dtype, device, seed)
    with torch.device("meta"):
        model = model_class(config)(config).to(dtype)
    model.materialize(device)
    load_hf_weights(model, path, config.num_layers)
    return model


__all__ = ["CausalLM", "ModelConfig", "build_model", "load_config", "load_model", "save_hf"]
