"""Model configuration: one typed view over a Hugging Face `config.json` of any supported family.

transformers' config classes parse the file, so defaults for missing fields are exactly the ones
`transformers` would use (a count from xplan and from transformers must agree on the same file).
xplan then reads the fields into `ModelConfig`, the only shape the runtime, tracer and cost models
see.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from xplan.errors import MAX_INPUT_BYTES, InputError

from .config_checks import check_raw_config, check_required_fields

# model_type in config.json -> family implemented by the runtime.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",  # Kimi K2 ships the DeepSeek-V3 architecture under its own name.
    "gpt_oss": "gpt_oss",
    # Vision-language: an InternViT tower + projector before a Qwen3 / Qwen3-MoE language model,
    # whose family the ModelConfig takes (runtime/models/vlm_config.py).
    "internvl": "internvl",
    "interns1": "internvl",
}


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural fact the runtime and planner need, normalised across families."""

    name: str
    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope: dict[str, Any]
    # Mixture of experts (num_experts == 0 for dense models).
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    norm_topk_prob: bool = False
    router: str = "none"  # softmax_topk | sigmoid_group_topk | topk_softmax
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    moe_layers: tuple[int, ...] = ()
    # Multi-head latent attention (DeepSeek-V3).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # GPT-OSS.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    swiglu_limit: float = 0.0
    # Vision tower and projector of a vision-language model ({} for text-only models; fields of
    # `vlm_config.VisionSpec`).
    vision: dict[str, Any] = field(default_factory=dict)
    # The parsed config, for writing config.json back out.
    hf_dict: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_vlm(self) -> bool:
        return bool(self.vision)

    @property
    def vision_spec(self):
        """The vision tower's `VisionSpec` (vision-language models only)."""
        from .vlm_config import vision_spec

        return vision_spec(self.vision)

    @property
    def attention_kind(self) -> str:
        return "mla" if self.family == "deepseek_v3" else "gqa"

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head as seen by the attention product."""
        if self.attention_kind == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.attention_kind == "mla" else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @functools.cached_property
    def block_kinds(self) -> frozenset[str]:
        """The MLP kinds of the decoder blocks present: 'dense', 'moe' or both."""
        return frozenset("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_layers))

    def layer_attention_type(self, layer: int) -> str:
        """'full_attention' or 'sliding_attention'."""
        return self.layer_types[layer] if self.layer_types else "full_attention"


def _hf_config_class(model_type: str):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "deepseek_v3": transformers.DeepseekV3Config,
        "kimi_k2": transformers.DeepseekV3Config,
        "gpt_oss": transformers.GptOssConfig,
    }
    return classes[model_type]


@functools.cache
def known_config_keys(model_type: str) -> set[str]:
    """Every key transformers' config class for `model_type` defines (its defaults' keys)."""
    cls = _hf_config_class(model_type)
    aliases = getattr(cls, "attribute_map", {})
    keys = set(cls().to_dict()) | set(vars(cls())) | set(aliases) | set(aliases.values())
    keys |= {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")}
    # Keys Hub configs carry that the config classes accept through **kwargs or fold away.
    return keys | {"rope_theta", "rope_scaling", "head_dim"}


def config_key_aliases(model_type: str) -> dict[str, str]:
    """Alternative names transformers accepts for a config key (both directions)."""
    aliases = dict(getattr(_hf_config_class(model_type), "attribute_map", {}))
    return aliases | {v: k for k, v in aliases.items()}


def hf_config_from_dict(raw: dict[str, Any]):
    """The transformers config object for a config.json dict (Kimi K2 parsed as DeepSeek-V3)."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"model_type {model_type!r} is not supported; supported model_types are "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}."
        )
    if SUPPORTED_MODEL_TYPES[model_type] == "internvl":  # Intern-S1 built as transformers' InternVL
        import transformers

        from .vlm_config import internvl_fields

        return transformers.InternVLConfig(**internvl_fields(raw))
    check_raw_config(raw, model_type, known_config_keys(model_type), config_key_aliases(model_type))
    check_required_fields(raw, model_type, config_key_aliases(model_type))
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
    # Hub checkpoints may carry a quantization block (GPT-OSS MXFP4); xplan trains in bf16/fp32.
    fields.pop("quantization_config", None)
    try:
        return _hf_config_class(model_type)(**fields)
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise several exception types
        raise InputError(f"config.json for model_type {model_type!r} is malformed: {exc}") from exc


def _int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"config field {name!r} must be an integer >= {minimum}, got {value!r}.")
    return value


def model_config_from_dict(raw: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Parse and validate a config.json dict into a ModelConfig."""
    if not isinstance(raw, dict):
        raise InputError("config.json must hold a JSON object.")
    if raw.get("model_type") in ("internvl", "interns1"):
        from .vlm_config import vlm_config_from_dict

        return vlm_config_from_dict(raw, name, model_config_from_dict)
    hf = hf_config_from_dict(raw)
    model_type = raw["model_type"]
    family = SUPPORTED_MODEL_TYPES[model_type]
    def g(name: str) -> Any:
        return getattr(hf, name, None)


    hidden = _int(g("hidden_size"), "hidden_size")
    heads = _int(g("num_attention_heads"), "num_attention_heads")
    kv_heads = _int(g("num_key_value_heads") or heads, "num_key_value_heads")
    layers = _int(g("num_hidden_layers"), "num_hidden_layers")
    vocab = _int(g("vocab_size"), "vocab_size")
    head_dim = g("head_dim") or hidden // heads
    if heads % kv_heads:
        raise InputError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}).")

    hf.standardize_rope_params()
    rope = dict(hf.rope_parameters or {})
    rope.setdefault("rope_type", "default")

    common: dict[str, Any] = dict(
        name=name,
        model_type=model_type,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_int(head_dim, "head_dim"),
        intermediate_size=_int(g("intermediate_size"), "intermediate_size"),
        rms_norm_eps=float(g("rms_norm_eps") or 1e-6),
        max_position_embeddings=_int(g("max_position_embeddings"), "max_position_embeddings"),
        tie_word_embeddings=bool(g("tie_word_embeddings")),
        attention_bias=bool(g("attention_bias")),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        rope=rope,
        hf_dict=hf.to_dict(),
    )
    if family == "qwen3_moe":
        experts = _int(g("num_experts"), "num_experts")
        step = _int(g("decoder_sparse_step") or 1, "decoder_sparse_step")
        mlp_only = set(g("mlp_only_layers") or [])
        common.update(
            num_experts=experts,
            top_k=_int(g("num_experts_per_tok"), "num_experts_per_tok"),
            moe_intermediate_size=_int(g("moe_intermediate_size"), "moe_intermediate_size"),
            norm_topk_prob=bool(g("norm_topk_prob")),
            router="softmax_topk",
            moe_layers=tuple(i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0),
        )
    elif family == "deepseek_v3":
        first_dense = _int(g("first_k_dense_replace") or 0, "first_k_dense_replace", minimum=0)
        q_lora = g("q_lora_rank")
        common.update(
            num_experts=_int(g("n_routed_experts"), "n_routed_experts"),
            top_k=_int(g("num_experts_per_tok"), "num_experts_per_tok"),
            moe_intermediate_size=_int(g("moe_intermediate_size"), "moe_intermediate_size"),
            num_shared_experts=_int(g("n_shared_experts") or 0, "n_shared_experts", minimum=0),
            norm_topk_prob=bool(g("norm_topk_prob")),
            router="sigmoid_group_topk",
            routed_scaling_factor=float(g("routed_scaling_factor") or 1.0),
            n_group=_int(g("n_group") or 1, "n_group"),
            topk_group=_int(g("topk_group") or 1, "topk_group"),
            moe_layers=tuple(range(first_dense, layers)),
            q_lora_rank=None if q_lora is None else _int(q_lora, "q_lora_rank"),
            kv_lora_rank=_int(g("kv_lora_rank"), "kv_lora_rank"),
            qk_nope_head_dim=_int(g("qk_nope_head_dim"), "qk_nope_head_dim"),
            qk_rope_head_dim=_int(g("qk_rope_head_dim"), "qk_rope_head_dim"),
            v_head_dim=_int(g("v_head_dim"), "v_head_dim"),
            head_dim=_int(g("qk_rope_head_dim"), "qk_rope_head_dim"),
        )
        if common["num_experts"] % common["n_group"]:
            raise InputError("n_routed_experts must be a multiple of n_group.")
    elif family == "gpt_oss":
        layer_types = tuple(g("layer_types") or ())
        if len(layer_types) != layers:
            raise InputError(f"layer_types must list one entry per layer ({layers}).")
        common.update(
            num_experts=_int(g("num_local_experts"), "num_local_experts"),
            top_k=_int(g("num_experts_per_tok"), "num_experts_per_tok"),
            moe_intermediate_size=_int(g("intermediate_size"), "intermediate_size"),
            router="topk_softmax",
            moe_layers=tuple(range(layers)),
            layer_types=layer_types,
            sliding_window=g("sliding_window"),
            swiglu_limit=float(g("swiglu_limit") or 0.0),
            attention_bias=True,
        )
    if common.get("num_experts", 0) and common["top_k"] > common["num_experts"]:
        raise InputError("num_experts_per_tok cannot exceed the number of experts.")
    return ModelConfig(**common)


PRESET_PACKAGE = "xplan.runtime.models.presets"


def preset_names() -> list[str]:
    files = resources.files(PRESET_PACKAGE.rsplit(".", 1)[0]).joinpath("presets")
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


def read_config_json(name_or_path: str | Path) -> tuple[Any, str]:
    """(the parsed config.json, the model's name) of a preset name or a directory (or file)
    holding a Hugging Face config.json; nothing validated yet (see `model_config_from_dict`)."""
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            if path.stat().st_size > MAX_INPUT_BYTES:
                raise InputError(f"{path} is larger than {MAX_INPUT_BYTES // 2**20} MiB: not a config.json.")
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InputError(f"cannot read {path} as a JSON config: {type(exc).__name__}: {exc}") from None
        return raw, str(name_or_path)
    presets = preset_names()
    if text in presets:
        data = resources.files(PRESET_PACKAGE.rsplit(".", 1)[0]).joinpath(f"presets/{text}.json").read_text()
        return json.loads(data), text
    if path.exists() or "/" in text:
        raise InputError(f"{text} has no config.json; pass a directory holding a Hugging Face config.json.")
    raise InputError(
        f"unknown model {text!r}: not a preset and not a directory with a config.json. "
        f"Presets: {', '.join(presets)} (see `xplan models`)."
    )


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name or a directory (or file) holding a Hugging Face config.json."""
    raw, name = read_config_json(name_or_path)
    return model_config_from_dict(raw, name=name)
