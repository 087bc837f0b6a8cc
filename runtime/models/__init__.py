"""Compact implementations of the supported architectures, with Hugging Face weight interop.

`CausalLM` (and torch with it) loads on first use: configs are read without torch.
"""

from typing import TYPE_CHECKING, Any

from .config import SUPPORTED_MODEL_TYPES, ModelConfig, load_config, model_config_from_dict, preset_names

if TYPE_CHECKING:
    from .transformer import CausalLM


def __getattr__(name: str) -> Any:
    if name == "CausalLM":
        from .transformer import CausalLM

        return CausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLM", "ModelConfig", "load_config", "model_config_from_dict",
           "preset_names"]
