"""Checks on a raw config.json before transformers fills in its defaults: a missing or misspelt
field that decides the model's size must not silently become transformers' default (a 24-layer,
2048-wide model), and absurd sizes fail fast instead of hanging a trace."""

from __future__ import annotations

import difflib
import sys
from typing import Any

from xplan.errors import InputError

COMMON_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
SIZE_FIELDS = {
    "llama": ("intermediate_size",),
    "qwen3": ("intermediate_size",),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    "kimi_k2": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
}
# Far past any published model (the largest have ~128 layers, hidden 16-18k, vocab ~260k, 384
# experts): beyond these a config is a mistake, and tracing it would take minutes.
UPPER_BOUNDS = {"num_hidden_layers": 4096, "hidden_size": 262_144, "intermediate_size": 1_048_576,
                "moe_intermediate_size": 1_048_576, "num_attention_heads": 8192, "num_key_value_heads": 8192,
                "vocab_size": 16_777_216, "num_experts": 65_536, "n_routed_experts": 65_536,
                "num_local_experts": 65_536, "max_position_embeddings": 1 << 30}
# Keys Hub config.json files carry that are not model hyperparameters.
METADATA_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
                 "quantization_config", "_name_or_path", "_attn_implementation_autoset", "name_or_path"}


def check_raw_config(raw: dict[str, Any], model_type: str, known_keys: set[str],
                     aliases: dict[str, str] | None = None) -> None:
    """InputError for a misspelt or invalid size field or an absurd size; a warning on stderr for
    other keys the family does not know. Missing fields: `check_required_fields`."""
    aliases = aliases or {}
    required = COMMON_SIZE_FIELDS + SIZE_FIELDS.get(model_type, ())
    unknown = sorted(k for k in raw if k not in known_keys and k not in METADATA_KEYS)
    for key in unknown:
        close = difflib.get_close_matches(key, required, n=1, cutoff=0.8)
        if close and close[0] not in raw and aliases.get(close[0]) not in raw:
            raise InputError(f"config.json has {key!r}, which {model_type} does not know: did you mean "
                             f"{close[0]!r}? (the size would otherwise be transformers' default)")
    for key in required:
        value = raw.get(key)
        if key in raw and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"config field {key!r} must be an integer >= 1, got {value!r}.")
    for key, bound in UPPER_BOUNDS.items():
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound:
            raise InputError(f"config.json {key} = {value} is beyond any model xplan can plan (at most {bound}).")
    if unknown:
        print(f"warning: config.json keys unknown to {model_type} are ignored: {', '.join(unknown)}",
              file=sys.stderr)


def check_required_fields(raw: dict[str, Any], model_type: str, aliases: dict[str, str] | None = None) -> None:
    """InputError for a size field config.json leaves to transformers' default (checked after the
    family's own consistency checks, which name the more specific problem first)."""
    aliases = aliases or {}
    required = COMMON_SIZE_FIELDS + SIZE_FIELDS.get(model_type, ())
    missing = [k for k in required if k not in raw and aliases.get(k) not in raw]
    if missing:
        raise InputError(f"config.json lacks {', '.join(missing)}, which decide the size of a {model_type} model "
                         "(transformers would fill in a default silently); add them.")
