"""Vision-language configs (InternVL, Intern-S1): an InternViT vision tower, a pixel-shuffle MLP
projector and a Qwen3 / Qwen3-MoE language model, read from one config.json.

The language model's fields fill `ModelConfig` exactly as a text-only config.json would (family
`qwen3` or `qwen3_moe`), so everything that plans or runs the language model is unchanged; the
vision tower and projector are described by `ModelConfig.vision` (plain JSON values), read through
`VisionSpec`.

`internvl` is transformers' model type; `interns1` is Intern-S1's own (its config.json names a
remote-code class of the same structure). Tied embeddings: transformers decides `internvl` by the
top-level `tie_word_embeddings` (default true); Intern-S1's remote code (transformers 4.x) by the
language model's, unless the top level names one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from xplan.errors import InputError

VLM_MODEL_TYPES = ("internvl", "interns1")
TEXT_MODEL_TYPES = ("qwen3", "qwen3_moe")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")
VISION_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Keys a Hub vision_config carries that change nothing xplan builds (dropout, init, remote-code names).
VISION_IGNORED = {"drop_path_rate", "dropout", "initializer_factor", "initializer_range", "attention_dropout",
                  "hidden_dropout_prob", "projection_dropout", "architectures", "auto_map", "model_type",
                  "torch_dtype", "dtype", "transformers_version", "_name_or_path", "qkv_bias", "qk_normalization",
                  "use_flash_attn", "chunk_size_feed_forward"}
TOP_KEYS = {"text_config", "vision_config", "image_token_id", "image_seq_length", "downsample_ratio",
            "projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy", "tie_word_embeddings",
            "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
            "_name_or_path", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache"}


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower and projector of a vision-language model (from `ModelConfig.vision`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_channels: int
    norm_type: str  # layer_norm | rms_norm
    norm_eps: float
    attention_bias: bool
    qk_norm: bool
    hidden_act: str
    use_absolute_position_embeddings: bool
    use_mask_token: bool
    use_mean_pooling: bool
    layer_scale_init_value: float
    downsample: int  # 1 / downsample_ratio: the pixel shuffle merges downsample**2 patches
    projector_act: str
    image_token_id: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def patches_per_image(self) -> int:
        """Tokens the vision tower runs per image (patches plus the class token)."""
        return self.grid[0] * self.grid[1] + 1

    @property
    def tokens_per_image(self) -> int:
        """Image tokens one image places in the language model's sequence."""
        return self.grid[0] * self.grid[1] // self.downsample**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def vision_spec(vision: dict[str, Any]) -> VisionSpec:
    return VisionSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in vision.items()})


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise InputError(f"vision_config {name} must be a positive integer or a pair of them, got {value!r}.")
    return pair  # type: ignore[return-value]


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"vision_config field {name!r} must be an integer >= 1, got {value!r}.")
    return value


def _vision_fields(raw_vision: Any, raw: dict[str, Any]) -> dict[str, Any]:
    import transformers

    if not isinstance(raw_vision, dict):
        raise InputError("config.json of a vision-language model needs a vision_config object.")
    missing = [k for k in VISION_SIZE_FIELDS if k not in raw_vision]
    if missing:
        raise InputError(f"vision_config lacks {', '.join(missing)}, which decide the vision tower's size; add them.")
    for key in VISION_SIZE_FIELDS:
        _int(raw_vision[key], key)
    known = set(transformers.InternVLVisionConfig().to_dict())
    unknown = sorted(k for k in raw_vision if k not in known and k not in VISION_IGNORED)
    if unknown:
        print(f"warning: vision_config keys unknown to InternViT are ignored: {', '.join(unknown)}", file=sys.stderr)
    try:
        hf = transformers.InternVLVisionConfig(**{k: v for k, v in raw_vision.items() if k in known})
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise several exception types
        raise InputError(f"vision_config is malformed: {exc}") from exc
    hidden, heads = hf.hidden_size, _int(hf.num_attention_heads, "num_attention_heads")
    if hidden % heads:
        raise InputError(f"vision_config hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}).")
    if hf.norm_type not in ("layer_norm", "rms_norm"):
        raise InputError(f"vision_config norm_type must be layer_norm or rms_norm, got {hf.norm_type!r}.")
    if hf.hidden_act not in ACTIVATIONS:
        raise InputError(f"vision_config hidden_act {hf.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)}).")
    image, patch = _pair(hf.image_size, "image_size"), _pair(hf.patch_size, "patch_size")
    if image[0] % patch[0] or image[1] % patch[1]:
        raise InputError(f"vision_config image_size {image} must be a multiple of patch_size {patch}.")

    ratio = raw.get("downsample_ratio", 0.5)
    downsample = round(1 / ratio) if isinstance(ratio, (int, float)) and 0 < ratio <= 1 else 0
    if downsample < 1 or abs(downsample * ratio - 1) > 1e-9:
        raise InputError(f"downsample_ratio must be 1/n for an integer n, got {ratio!r}.")
    grid = (image[0] // patch[0], image[1] // patch[1])
    if grid[0] != grid[1] or grid[0] % downsample:
        raise InputError(f"the patch grid {grid} must be square and divisible by 1/downsample_ratio ({downsample}).")
    act = raw.get("projector_hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise InputError(f"projector_hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)}).")
    if raw.get("vision_feature_layer", -1) != -1:
        raise InputError("vision_feature_layer other than -1 (the last layer) is not supported.")
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise InputError("vision_feature_select_strategy must be 'default' (the class token is dropped).")
    token = raw.get("image_token_id", 151667)
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise InputError(f"image_token_id must be a non-negative integer, got {token!r}.")
    return dict(
        hidden_size=hidden, num_layers=_int(hf.num_hidden_layers, "num_hidden_layers"), num_heads=heads,
        intermediate_size=hf.intermediate_size, image_size=image, patch_size=patch,
        num_channels=_int(hf.num_channels, "num_channels"), norm_type=hf.norm_type,
        norm_eps=float(hf.layer_norm_eps), attention_bias=bool(hf.attention_bias), qk_norm=bool(hf.use_qk_norm),
        hidden_act=hf.hidden_act, use_absolute_position_embeddings=bool(hf.use_absolute_position_embeddings),
        use_mask_token=bool(hf.use_mask_token), use_mean_pooling=bool(hf.use_mean_pooling),
        layer_scale_init_value=float(hf.layer_scale_init_value), downsample=downsample, projector_act=act,
        image_token_id=token,
    )


def vlm_config_from_dict(raw: dict[str, Any], name: str, text_parser) -> Any:
    """The ModelConfig of an `internvl` / `interns1` config.json; `text_parser(raw_text, name)`
    parses the language model's config (`config.model_config_from_dict`)."""
    import dataclasses

    model_type = raw["model_type"]
    text = raw.get("text_config")
    if not isinstance(text, dict) or text.get("model_type") not in TEXT_MODEL_TYPES:
        got = text.get("model_type") if isinstance(text, dict) else None
        raise InputError(f"{model_type} needs a text_config with model_type {' or '.join(TEXT_MODEL_TYPES)}, "
                         f"got {got!r}.")
    unknown = sorted(k for k in raw if k not in TOP_KEYS)
    if unknown:
        print(f"warning: config.json keys unknown to {model_type} are ignored: {', '.join(unknown)}", file=sys.stderr)
    vision = _vision_fields(raw.get("vision_config"), raw)
    if vision["image_token_id"] >= _int(text.get("vocab_size"), "text_config.vocab_size"):
        raise InputError(f"image_token_id ({vision['image_token_id']}) must be below the language model's "
                         f"vocab_size ({text['vocab_size']}).")
    lm = text_parser(text, name)
    if model_type == "internvl":
        tie = raw.get("tie_word_embeddings", True)
    else:
        tie = raw.get("tie_word_embeddings", lm.tie_word_embeddings)
    hf_dict = {k: v for k, v in raw.items() if k != "text_config"} | {"text_config": dict(lm.hf_dict)}
    hf_dict["text_config"]["model_type"] = lm.model_type
    hf_dict["tie_word_embeddings"] = bool(tie)
    return dataclasses.replace(lm, model_type=model_type, tie_word_embeddings=bool(tie), vision=vision,
                               hf_dict=hf_dict)


def internvl_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of transformers' InternVLConfig for an internvl / interns1 config.json
    (Intern-S1's vision_config read as InternViT's; tying as `vlm_config_from_dict` decides)."""
    config = model_config_from_raw(raw)
    vision = {k: v for k, v in raw["vision_config"].items() if k not in ("model_type", "architectures", "auto_map")}
    text = dict(config.hf_dict["text_config"])
    return {k: v for k, v in raw.items() if k in TOP_KEYS and k not in ("model_type", "architectures", "auto_map")} | {
        "vision_config": vision, "text_config": text, "tie_word_embeddings": config.tie_word_embeddings}


def model_config_from_raw(raw: dict[str, Any]):
    from .config import model_config_from_dict

    return model_config_from_dict(raw)


def check_image_tokens(config, image_tokens: int, seq_len: int) -> None:
    """InputError unless `image_tokens` per sample fit the model and the sequence: whole images
    (a multiple of the image tokens one image gives) and text after them."""
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 0:
        raise InputError(f"--image-tokens must be a non-negative integer, got {image_tokens!r}.")
    if not image_tokens:
        return
    if not config.is_vlm:
        raise InputError(f"--image-tokens needs a vision-language model; {config.name} ({config.model_type}) has no "
                         "vision tower.")
    per_image = vision_spec(config.vision).tokens_per_image
    if image_tokens % per_image:
        raise InputError(f"--image-tokens ({image_tokens}) must be a multiple of the {per_image} image tokens one "
                         f"image gives {config.name}.")
    if image_tokens >= seq_len:
        raise InputError(f"--image-tokens ({image_tokens}) must leave text in the sequence (seq_len {seq_len}).")
