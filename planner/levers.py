"""Why a plan uses its memory levers: what each one saves and what it costs.

A lever is a layout setting that trades time for memory (recompute, offload, token tiling) or
memory for time (keep_gathered). For each lever a plan uses, the same layout is priced without it: the difference
in device peak, the host bytes it needs, the difference in step time, and whether the plan would
still fit without it. `xplan search` and `xplan estimate` print one line per lever.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Lever:
    name: str  # e.g. "recompute full", "offload activations", "keep_gathered moe"
    device_gib: float  # device peak without the lever minus with it (> 0: the lever saves memory)
    host_gib: float  # host memory per device it needs (offload)
    time_s: float  # step time with it minus without it (> 0: the lever costs time)
    share: float  # time_s over the step time without it
    fits_without: bool
    short_without: str = ""  # what it would not fit without it: "device memory" or "host memory"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        memory = (f"saves {self.device_gib:.1f} GiB on the device" if self.device_gib >= 0
                  else f"costs {-self.device_gib:.1f} GiB on the device")
        if self.host_gib:
            memory += f", holds {self.host_gib:.1f} GiB in host memory"
        time = (f"costs {self.time_s:.3f} s/step ({self.share:+.1%})" if self.time_s >= 0
                else f"saves {-self.time_s:.3f} s/step ({self.share:+.1%})")
        need = "not needed to fit" if self.fits_without else f"needed to fit {self.short_without or 'in memory'}"
        return f"{self.name}: {memory}; {time}; {need}"


def alternatives(layout) -> list[tuple[str, dict[str, Any]]]:
    """(lever, the layout changes that remove it) for every lever `layout` uses."""
    out: list[tuple[str, dict[str, Any]]] = []
    if layout.recompute != "none":
        out.append((f"recompute {layout.recompute}", {"recompute": "none"}))
    if layout.vision_recompute != "none":
        out.append((f"vision_recompute {layout.vision_recompute}", {"vision_recompute": "none"}))
    for kind in layout.offload:
        out.append((f"offload {kind}", {"offload": [k for k in layout.offload if k != kind]}))
    if layout.keep_gathered:
        out.append((f"keep_gathered {','.join(layout.keep_gathered)}", {"keep_gathered": []}))
    if layout.tile_tokens:
        out.append((f"tile_tokens {layout.tile_tokens}", {"tile_tokens": None}))
    return out


def lever_host_bytes(name: str, memory) -> float:
    """Host bytes per device a lever accounts for."""
    if name == "offload activations":
        return memory.host_activations
    if name.startswith("offload "):
        return memory.host_states
    return 0.0


def explain_levers(est, workload, pricing=None) -> list[Lever]:
    """Each lever of `est`'s layout priced away (see the module docstring)."""
    from xplan.cost_models import PricingContext, estimate
    from xplan.cost_models.compute import traced_loss
    from xplan.cost_models.estimate import rank_profile
    from xplan.layout_tiles import feed_forward_tiles

    from .pricing import get_trace, load_hw, load_model_config

    config = load_model_config(workload.model)
    profile = load_hw(workload.hardware)
    pricing = pricing or PricingContext(rank_profile(profile, est.layout))  # a3: estimate prices per die
    loss = traced_loss(est.layout.kernels.get("loss", "chunked"))
    out = []
    for name, changes in alternatives(est.layout):
        layout = est.layout.with_changes(**changes)
        trace = get_trace(workload.model, workload.seq_len, loss, feed_forward_tiles(layout, workload.seq_len),
                          workload.image_tokens)
        alt = estimate(trace, config, layout, profile, workload.global_batch, workload.imbalance, pricing=pricing,
                       image_fraction=workload.image_fraction)
        out.append(Lever(name=name, device_gib=(alt.memory.total - est.memory.total) / GIB,
                         host_gib=lever_host_bytes(name, est.memory) / GIB,
                         time_s=est.step_time_s - alt.step_time_s,
                         share=(est.step_time_s - alt.step_time_s) / alt.step_time_s if alt.step_time_s else 0.0,
                         fits_without=alt.fits,
                         short_without="" if alt.fits else "device memory" if alt.memory.allocated > alt.hbm_bytes
                         else "host memory"))
    return out


__all__ = ["Lever", "alternatives", "explain_levers"]
