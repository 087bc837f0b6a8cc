"""`check_layout`: a layout's divisibility and architectural constraints against a model (the
rank arithmetic itself is in xplan/layout.py); `image_refusals`: what image batches need of it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from xplan.errors import InputError

if TYPE_CHECKING:
    from xplan.layout import Layout


def check_layout(layout: Layout, config, seq_len: int, global_batch: int | None = None) -> None:
    """Divisibility and architectural constraints; raises InputError naming the first violation.

    `config` is a runtime ModelConfig (only its fields are read).
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    d = layout
    need(d.ranks % (d.tp * d.pp) == 0,
         f"{d.ranks_text(noun_first=True)} must be a multiple of tp × pp ({d.tp} × {d.pp}).")
    need(d.dp_world % d.sp == 0, f"sp ({d.sp}) must divide the data-parallel world ({d.dp_world} = ranks / (tp × pp)).")
    need(d.dp_world % d.fsdp == 0,
         f"fsdp ({d.fsdp}) must divide the data-parallel world ({d.dp_world}); use a divisor for HSDP.")
    if d.fsdp > 1:
        need(d.fsdp % d.ep == 0, f"ep ({d.ep}) must divide the FSDP shard group ({d.fsdp}): experts are split "
                                 "over EP ranks inside each shard group.")
    else:
        # Megatron-style: the expert-parallel group may span tensor-parallel ranks (expert TP = 1).
        need((d.dp_world * d.tp) % d.ep == 0,
             f"ep ({d.ep}) must divide the data-parallel × tensor-parallel ranks ({d.dp_world} × {d.tp}).")
    if d.ep > 1:
        need(config.num_experts > 0, f"ep = {d.ep} needs a mixture-of-experts model; {config.name} is dense.")
        need(config.num_experts % d.ep == 0,
             f"ep ({d.ep}) must divide the number of routed experts ({config.num_experts}).")
    need(d.vision_recompute == "none" or config.is_vlm,
         f"vision_recompute = {d.vision_recompute} needs a vision-language model; {config.name} has no vision tower.")
    if d.sp > 1:
        heads, kv = config.num_heads, config.num_kv_heads
        if config.attention_kind == "mla":
            kv = heads  # MLA expands its latent into one k/v per head before attention
        need(heads % d.sp == 0, f"Ulysses sp ({d.sp}) must divide the attention heads ({heads}).")
        need(kv % d.sp == 0 or d.sp % kv == 0,
             f"Ulysses sp ({d.sp}) and the kv heads ({kv}) must divide one another (kv heads are repeated "
             "when sp exceeds them).")
        need(seq_len % d.sp == 0, f"seq_len ({seq_len}) must be a multiple of sp ({d.sp}).")
    if d.tp > 1:
        need(config.num_heads % d.tp == 0, f"tp ({d.tp}) must divide the attention heads ({config.num_heads}).")
    if d.pp > 1 or d.vpp > 1:
        # Embedding and loss may take a virtual stage each (as Megatron's uneven split allows).
        need(config.num_layers + 2 >= d.pp * d.vpp,
             f"pp × vpp ({d.pp} × {d.vpp}) stages cannot exceed the layers ({config.num_layers}) + 2.")
    need(d.vpp == 1 or d.pp > 1, "vpp > 1 needs pipeline parallelism (pp > 1).")
    if d.ep_overlap == "dualpipe":
        need(d.pp > 1 and d.pp % 2 == 0 and d.vpp == 1,
             f"ep_overlap dualpipe is DeepSeek's DualPipe schedule: it needs an even pp > 1 and vpp 1 "
             f"(got pp {d.pp}, vpp {d.vpp}).")
    if d.keep_gathered:
        present = config.block_kinds | ({"vision"} if config.is_vlm else set())
        missing = [k for k in d.keep_gathered if k not in present]
        need(not missing, f"keep_gathered names {', '.join(missing)} blocks, but {config.name} has only "
                          f"{', '.join(sorted(present))} blocks.")
    if global_batch is not None:
        layout.grad_accum(global_batch)


def image_refusals(layout: Layout, image_tokens: int, image_fraction: float, tokens_per_image: int) -> list[str]:
    """Why the runtime would not run image + text batches on `layout` (empty: it runs them; only its
    sp, tp, pp and micro_batch are read, so the search's pinned flags can be checked too):
    `image_tokens` per image sample (`tokens_per_image` per image), a share `image_fraction` of the
    samples carrying images. One declaration for the runtime's check, the search's space and the
    verdict estimate and whatif print. Each Ulysses rank runs the vision tower on 1/sp of a
    micro-batch's images (runtime/distributed/ulysses.py); tensor and pipeline parallelism would
    split the model before the image features join the sequence."""
    if not image_tokens:
        return []
    out = []
    if image_fraction < 1 and layout.sp > 1:
        out.append(f"image_fraction {image_fraction:g} mixes text-only samples into the batches, so the images of "
                   f"a micro-batch vary, but Ulysses sp {layout.sp} splits each micro-batch's images evenly over its "
                   "ranks; use sp 1 (e.g. a larger fsdp) or image_fraction 1")
    if layout.tp > 1 or layout.pp > 1:
        out.append(f"image tokens run with fsdp, ep and sp only; the layout has tp {layout.tp}, pp {layout.pp}")
    per_sample = image_tokens // tokens_per_image
    images = layout.micro_batch * per_sample
    if layout.sp > 1 and images % layout.sp:
        out.append(f"with sp {layout.sp} each Ulysses rank runs the vision tower on 1/{layout.sp} of a "
                   f"micro-batch's images, but a micro-batch holds {images} (micro_batch {layout.micro_batch} x "
                   f"{per_sample} per sample); make micro_batch x images per sample a multiple of sp (e.g. "
                   f"micro_batch {layout.sp // math.gcd(layout.sp, per_sample)}), or lower sp")
    return out
