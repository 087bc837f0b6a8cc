"""InternVL / Intern-S1: InternViT vision tower, pixel-shuffle MLP projector and the shared causal LM.

Image features replace the image placeholder tokens of the sequence, in order, before the language
model's first layer. Local names keep the language model where every text model has it
(`model.layers.N`, `lm_head`), so parallelisms, tracing and dry runs treat it as any other; the
vision tower and projector sit beside it (`vision_tower.*`, `multi_modal_projector.*`).
`hf_key_to_local` / `local_key_to_hf` map the Hugging Face checkpoint names: transformers 5 writes
`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`; Intern-S1's checkpoints and
transformers' in-memory layout use `model.language_model.*`, `model.vision_tower.*`, ... (both load).

Ulysses sequence parallelism (`distributed.ulysses.apply_ulysses_images`): each rank of a Ulysses
group holds a chunk of every sequence and 1/sp of the micro-batch's images; it runs the vision tower
on its images, `gather_images` all-gathers the features over the group (backward reduce-scatters
their gradients) and `merge_image_chunk` places those whose placeholders fall in the rank's chunk.

Mixed image / text batches (`training.image_fraction` < 1): a micro-batch may hold fewer images, or
none (`pixel_values` with zero rows). The vision tower still runs on every rank for every
micro-batch, because its embeddings, layers and projector are FSDP2 units: a rank that skipped them
would skip their all-gathers and gradient reduce-scatters while the other ranks wait in them.
`zero_rows` is what each unit computes for zero rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .transformer import CausalLM
from .vlm_config import VisionSpec

# Hugging Face prefix -> local prefix (loading); the first of each local prefix is written on save.
HF_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def zero_rows(module: nn.Module, x: torch.Tensor, shape: tuple[int, ...], skip: tuple[str, ...] = ()) -> torch.Tensor:
    """`module`'s output for an input `x` with zero rows (a micro-batch without images): zeros of
    `shape` (zero rows) plus, times zero, the sum of `x` and of each parameter the module's forward
    uses (all but `skip`). The output stays in the autograd graph of `x` and of those parameters, so
    the backward reaches every unit of the tower (FSDP2's pre-backward all-gather and post-backward
    reduce-scatter fire as on ranks with images) and gives each parameter a zero gradient (FSDP2
    reduce-scatters the parameters that have a gradient: the set must match on every rank).

    Why not run the layers on the empty batch: not every kernel takes zero rows (torchao's fp8
    linears take the amax of their input, which fails on an empty tensor; flash attention
    refused a batch of 0 in several torch releases). Why not a dummy image whose features are
    multiplied by zero: it costs a full image of vision compute per image-less micro-batch (twice
    the priced vision compute at image_fraction 0.5 with one image per sample). This costs one sum
    per parameter and runs the same on every device and precision."""
    params = [p for name, p in module.named_parameters() if name not in skip]
    dtype = params[0].dtype if params else x.dtype
    touched = x.sum().to(dtype) + sum(p.sum().to(dtype) for p in params)
    return torch.zeros(shape, dtype=dtype, device=x.device) + touched * 0


def activation(name: str):
    return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu_pytorch_tanh" else F.gelu


def vision_norm(spec: VisionSpec, dim: int) -> nn.Module:
    if spec.norm_type == "rms_norm":
        return RMSNorm(dim, spec.norm_eps)
    return nn.LayerNorm(dim, eps=spec.norm_eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.projection = nn.Conv2d(spec.num_channels, spec.hidden_size, kernel_size=spec.patch_size,
                                    stride=spec.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixel_values.to(self.projection.weight.dtype))  # [n, hidden, gh, gw]
        return x.flatten(2).transpose(1, 2)


class VisionEmbeddings(nn.Module):
    """Class token + patch embeddings (+ learned absolute positions at the configured image size)."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.image_size = spec.image_size
        self.tokens, self.hidden_size = spec.patches_per_image + 1, spec.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.hidden_size))
        if spec.use_mask_token:  # masked-image pretraining only; kept so checkpoints load
            self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.hidden_size))
        self.patch_embeddings = PatchEmbeddings(spec)
        if spec.use_absolute_position_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, spec.patches_per_image, spec.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != tuple(self.image_size):
            raise ValueError(f"images must be {self.image_size[0]}x{self.image_size[1]} pixels (the vision tower's "
                             f"image_size), got {tuple(pixel_values.shape[-2:])}")
        if pixel_values.shape[0] == 0:  # a micro-batch without images (`zero_rows`); mask_token is never used
            return zero_rows(self, pixel_values, (0, self.tokens, self.hidden_size), skip=("mask_token",))
        x = self.patch_embeddings(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings
        return x


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention; optional RMS q/k norms over the full width (InternViT-6B)."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.q_proj = nn.Linear(h, h, bias=spec.attention_bias)
        self.k_proj = nn.Linear(h, h, bias=spec.attention_bias)
        self.v_proj = nn.Linear(h, h, bias=spec.attention_bias)
        self.projection_layer = nn.Linear(h, h)
        if spec.qk_norm:
            self.q_norm = RMSNorm(h, 1e-6)  # transformers' InternViT uses its default eps here
            self.k_norm = RMSNorm(h, 1e-6)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, h = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(n, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.projection_layer(out.transpose(1, 2).reshape(n, s, h))


class VisionMLP(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = activation(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm block with learned per-channel residual scales (`lambda_1`, `lambda_2`)."""

    kind = "vision"

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.layernorm_before = vision_norm(spec, spec.hidden_size)
        self.attention = VisionAttention(spec)
        self.layernorm_after = vision_norm(spec, spec.hidden_size)
        self.mlp = VisionMLP(spec)
        self.lambda_1 = nn.Parameter(torch.full((spec.hidden_size,), spec.layer_scale_init_value))
        self.lambda_2 = nn.Parameter(torch.full((spec.hidden_size,), spec.layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a micro-batch without images (`zero_rows`)
            return zero_rows(self, x, tuple(x.shape))
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class VisionEncoder(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.layer = nn.ModuleList(VisionLayer(spec) for _ in range(spec.num_layers))


class VisionTower(nn.Module):
    """InternViT: pixels [images, channels, H, W] -> features [images, patches + 1, hidden]."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.embeddings = VisionEmbeddings(spec)
        self.encoder = VisionEncoder(spec)
        if not spec.use_mean_pooling:
            self.layernorm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x)
        if not hasattr(self, "layernorm"):
            return x
        return zero_rows(self.layernorm, x, tuple(x.shape)) if x.shape[0] == 0 else self.layernorm(x)


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """[images, g, g, c] -> [images, (g/f)^2, c*f^2]: each f x f block of patches becomes one token
    (the channel order transformers' InternVL uses: column pairs first, then rows)."""
    n, g, _, c = features.shape
    x = features.reshape(n, g, g // factor, c * factor).transpose(1, 2)
    x = x.reshape(n, g // factor, g // factor, c * factor * factor).transpose(1, 2)
    return x.reshape(n, (g // factor) ** 2, c * factor * factor)


class Projector(nn.Module):
    """LayerNorm + two-layer MLP from shuffled vision features to the language model's width."""

    def __init__(self, spec: VisionSpec, text_hidden: int):
        super().__init__()
        width = spec.hidden_size * spec.downsample**2
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.act = activation(spec.projector_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [tokens, width] -> [tokens, text hidden]: 2-D in and out, so the output of this FSDP
        unit is no view (a linear over 3-D input returns one, which FSDP2 warns may lose its hook)."""
        if x.shape[0] == 0:  # a micro-batch without images (`zero_rows`)
            return zero_rows(self, x, (0, self.linear_2.out_features))
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


def merge_image_features(embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Put the rows of `features` [tokens, hidden] at the True positions of `image_mask` [b, s], in
    order (static shapes: runs under fake tensors)."""
    flat_mask = image_mask.reshape(-1)
    index = (torch.cumsum(flat_mask.to(torch.int64), 0) - 1).clamp(min=0, max=max(features.shape[0] - 1, 0))
    picked = features.to(embeds.dtype)[index].view_as(embeds)
    return torch.where(image_mask[..., None], picked, embeds)


def merge_image_chunk(embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """`merge_image_features` for a chunk of each sequence (Ulysses): `features` [b * n, hidden] are
    the image tokens of all `b` samples of the micro-batch, `n` per sample, which come first in each
    sample, so the placeholder at global position p of row r takes row r * n + p (`positions`: the
    chunk's global positions, [b or 1, s_local])."""
    b = embeds.shape[0]
    per_sample = features.shape[0] // b
    rows = torch.arange(b, device=positions.device)[:, None] * per_sample
    index = (rows + positions).clamp(max=max(features.shape[0] - 1, 0)).reshape(-1)
    picked = features.to(embeds.dtype)[index].view_as(embeds)
    return torch.where(image_mask[..., None], picked, embeds)


def _concrete(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type != "meta" and not isinstance(t, FakeTensor)


class VisionLanguageLM(CausalLM):
    """`forward(input_ids, positions=None, pixel_values=None)` -> logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.spec = config.vision_spec
        self.vision_tower = VisionTower(self.spec)
        self.multi_modal_projector = Projector(self.spec, config.hidden_size)
        # Ulysses (set by `distributed.ulysses.apply_ulysses_images`): this rank's image features
        # [images / sp, tokens, hidden] -> the micro-batch's [images, tokens, hidden]; None without sp.
        self.gather_images = None

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [images, C, H, W] -> language-model inputs [images, tokens_per_image, hidden]."""
        features = self.vision_tower(pixel_values)[:, 1:]  # drop the class token
        g = self.spec.grid[0]  # sizes spelled out: a micro-batch may have zero images
        features = pixel_shuffle(features.reshape(features.shape[0], g, g, features.shape[-1]), self.spec.downsample)
        rows = self.multi_modal_projector(features.reshape(-1, features.shape[-1]))
        return rows.view(features.shape[0], features.shape[1], rows.shape[-1])

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        if self.gather_images is not None:
            return self._embed_chunk(embeds, input_ids, pixel_values, positions)
        features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
        mask = input_ids == self.spec.image_token_id
        if _concrete(mask) and int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the batch holds {int(mask.sum())} image tokens but its images give {features.shape[0]}")
        if features.shape[0] == 0:  # text-only samples: the tower ran on zero rows; their empty sum
            return embeds + features.sum().to(embeds.dtype)  # (exactly 0) keeps it in the graph
        return merge_image_features(embeds, mask, features)

    def _embed_chunk(self, embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     positions: torch.Tensor | None) -> torch.Tensor:
        """Ulysses: this rank's images through the tower, all ranks' features gathered, the ones
        whose placeholders are in this rank's chunk of each sequence merged."""
        if positions is None:
            raise ValueError("sequence-parallel image batches need the chunk's global positions")
        features = self.gather_images(self.image_features(pixel_values)).reshape(-1, embeds.shape[-1])
        mask = input_ids == self.spec.image_token_id
        if _concrete(mask):
            per_sample = features.shape[0] // max(input_ids.shape[0], 1)
            if features.shape[0] != per_sample * input_ids.shape[0] or \
                    bool((mask != (positions < per_sample)).any()):
                raise ValueError(f"each sample's {per_sample} image tokens must be its first tokens (the images of "
                                 f"{input_ids.shape[0]} samples give {features.shape[0]})")
        return merge_image_chunk(embeds, mask, features, positions)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds=self.embed(input_ids, pixel_values, positions))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, positions, pixel_values))

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        super().init_weights(seed, std)  # linears normal, biases zero; vision norms and scales below
        for name, param in self.named_parameters():
            if not name.startswith(("vision_tower.", "multi_modal_projector.")):
                continue
            leaf = name.rsplit(".", 1)[-1]
            module_name = name.rsplit(".", 2)[-2] if name.count(".") > 1 else ""
            if leaf.startswith("lambda_"):
                param.fill_(self.spec.layer_scale_init_value)
            elif "norm" in module_name:
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                param.zero_()

    @staticmethod
    def hf_key_to_local(key: str) -> str:
        for hf, local in HF_PREFIXES:
            if key.startswith(hf):
                return local + key[len(hf):]
        return key

    @staticmethod
    def local_key_to_hf(key: str) -> str:
        for hf, local in HF_PREFIXES:
            if key.startswith(local):
                return hf + key[len(local):]
        return key
