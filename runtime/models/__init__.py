"""Compact implementations of the supported architectures, with Hugging Face weight interop."""

from .config import SUPPORTED_MODEL_TYPES, ModelConfig, load_config, model_config_from_dict, preset_names
from .transformer import CausalLM

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLM", "ModelConfig", "load_config", "model_config_from_dict",
           "preset_names"]
