"""Glue from names to numbers: load model and profile, trace (cached), price a layout."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from xplan.cost_models import Estimate, estimate
from xplan.cost_models.compute import traced_loss
from xplan.errors import InputError
from xplan.layout import (
    DEVICE_TYPE_OF_KIND,
    Layout,
    flat_to_nested,
    layout_from_dict,
    parse_knob,
    runtime_refusals,
)
from xplan.layout_check import image_refusals
from xplan.layout_tiles import feed_forward_tiles

# Longest sequence priced: 16M tokens, far past any published context (traced shapes beyond it
# overflow tensor sizes).
MAX_SEQ_LEN = 2**24


def check_seq_len(seq_len: int) -> None:
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise InputError(f"--seq-len must be a positive integer up to {MAX_SEQ_LEN:,}, got {seq_len}.")


@dataclass(frozen=True)
class Workload:
    """What is being trained: model, hardware, sequence length and global batch (sequences)."""

    model: str
    hardware: str
    seq_len: int
    global_batch: int
    imbalance: float | None = None  # busiest EP rank's routed load over the mean; None: the sourced default
    image_tokens: int = 0  # image tokens per sample (vision-language models; the images come first)
    image_fraction: float = 1.0  # share of samples that carry images (the rest text only)

    @classmethod
    def of_plan(cls, plan, imbalance: float | None = None) -> Workload:
        """The workload a loaded plan (xplan.plan.Plan) trains."""
        t = plan.training
        return cls(plan.model, plan.hardware, t.seq_len, t.global_batch, imbalance, t.image_tokens, t.image_fraction)

    def images(self) -> dict[str, float]:
        """The image settings of a vision-language workload for JSON output ({} without images)."""
        if not self.image_tokens:
            return {}
        per_image = load_model_config(self.model).vision_spec.tokens_per_image
        return {"image_tokens": self.image_tokens, "images_per_sample": self.image_tokens // per_image,
                "image_fraction": self.image_fraction}

    def check(self) -> None:
        check_seq_len(self.seq_len)
        if self.global_batch < 1:
            raise InputError(f"--global-batch must be a positive integer, got {self.global_batch}.")
        if not 0 < self.image_fraction <= 1:
            raise InputError(f"--image-fraction is the share of samples that carry images, in (0, 1]; got "
                             f"{self.image_fraction}.")
        if self.image_fraction < 1 and not self.image_tokens:
            raise InputError("--image-fraction needs --image-tokens: the image tokens of a sample that carries "
                             "images.")
        if self.imbalance is not None and self.imbalance < 1.0:
            raise InputError(f"--imbalance is the busiest rank's load over the mean and must be >= 1, "
                             f"got {self.imbalance}.")


@lru_cache(maxsize=32)
def load_model_config(model: str):
    from xplan.planner.trace.configs import load_model_config as cached_config

    return cached_config(model)


def image_tokens_of(model: str, image_tokens: int, images: int | None) -> int:
    """The image tokens per sample: --image-tokens, or --images x the model's tokens per image."""
    if images is None:
        return image_tokens
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise InputError(f"--images must be a non-negative integer, got {images!r}.")
    config = load_model_config(model)
    if not config.is_vlm:
        raise InputError(f"--images needs a vision-language model; {config.name} has no vision tower.")
    per_image = config.vision_spec.tokens_per_image
    if image_tokens and image_tokens != images * per_image:
        raise InputError(f"--images {images} means {images * per_image} image tokens ({per_image} per image), but "
                         f"--image-tokens is {image_tokens}; give one of the two.")
    return images * per_image


@lru_cache(maxsize=16)
def load_hw(hardware: str):
    from xplan.hw_profiles import load_profile

    return load_profile(hardware)


@lru_cache(maxsize=64)
def get_trace(model: str, seq_len: int, loss: str, tiles: int = 1, image_tokens: int = 0):
    """The trace at micro-batch 1; `tiles`: a layout's `xplan.layout_tiles.feed_forward_tiles`."""
    from xplan.planner.trace import trace_model

    return trace_model(load_model_config(model), seq_len, micro_batch=1, loss=loss, tiles=tiles,
                       image_tokens=image_tokens)


def price(workload: Workload, layout: Layout) -> Estimate:
    workload.check()
    config = load_model_config(workload.model)
    profile = load_hw(workload.hardware)
    if layout.devices < 1:
        raise InputError(f"--devices must be a positive integer, got {layout.devices}.")
    trace = get_trace(workload.model, workload.seq_len, traced_loss(layout.kernels.get("loss", "chunked")),
                      feed_forward_tiles(layout, workload.seq_len), workload.image_tokens)
    return estimate(trace, config, layout, profile, workload.global_batch, workload.imbalance,
                    image_fraction=workload.image_fraction)


def workload_image_refusals(workload: Workload, layout) -> list[str]:
    """`xplan.layout_check.image_refusals` of `layout` (or anything with its sp, tp, pp and
    micro_batch) for the workload's image tokens and image fraction."""
    config = load_model_config(workload.model)
    per_image = config.vision_spec.tokens_per_image if config.is_vlm else 1
    return image_refusals(layout, workload.image_tokens, workload.image_fraction, per_image)


def run_refusals(workload: Workload, layout: Layout) -> list[str]:
    """Why `xplan run` would refuse `layout` for `workload` on its hardware's device type (empty: it
    runs as priced): the layout's own values (`xplan.layout.runtime_refusals`) and what image
    batches need of it (`workload_image_refusals`)."""
    device_type = DEVICE_TYPE_OF_KIND.get(load_hw(workload.hardware).device.kind, "cuda")
    return runtime_refusals(layout, device_type) + workload_image_refusals(workload, layout)


def check_pinned_images(workload: Workload, pinned: dict[str, Any]) -> None:
    """Pinned sp and micro_batch the runtime refuses for image batches leave a search nothing to
    price: say why (`workload_image_refusals`) instead of finding nothing. Unpinned, the search
    enumerates only what the runtime runs (`planner.search.core_layouts`)."""
    if not (workload.image_tokens and load_model_config(workload.model).is_vlm) or pinned.get("sp", 1) == 1:
        return
    sp = pinned["sp"]
    pins = SimpleNamespace(sp=sp, tp=1, pp=1, micro_batch=pinned.get("micro_batch", sp))  # unpinned: one that divides
    refusals = workload_image_refusals(workload, pins)
    if refusals:
        raise InputError(f"the pinned flags leave nothing the runtime runs: {refusals[0]}.")


def device_kernel_defaults(profile) -> dict[str, str]:
    """Kernel defaults that depend on the device: the runtime compiles blocks (fused elementwise
    kernels) on accelerators and stays eager on CPU. The search and estimate both start from these."""
    return {"elementwise": "eager" if profile.device.kind == "cpu" else "fused"}


def layout_from_flags(flags: dict[str, Any], profile) -> Layout:
    """Layout from CLI flags ({knob: value, None where unset}); unset knobs take the declared
    defaults (see xplan.layout), or the device's (`device_kernel_defaults`). The hardware's ranks
    per device (a3: 2) come from `profile`, not a flag."""
    defaults = {k: v for k, v in device_kernel_defaults(profile).items() if flags.get(k) is None}
    checked = {name: parse_knob(name, value) for name, value in {**flags, **defaults}.items() if value is not None}
    return layout_from_dict({**flat_to_nested(checked), "ranks_per_device": profile.device.ranks_per_device})
