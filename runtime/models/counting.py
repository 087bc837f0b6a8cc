"""Parameter counts of a built model (on meta tensors: nothing is allocated)."""

from __future__ import annotations

from collections import Counter

from torch import nn

from .moe import MoE
from .parameter_counts import ParameterCounts


def count_parameters(model: nn.Module) -> ParameterCounts:
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    routed = 0
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            n = sum(p.numel() for p in module.experts.parameters())
            routed += n
            inactive += n * (module.num_experts - module.top_k) / module.num_experts
    kinds = Counter(layer.kind for layer in model.model.layers)
    vision = sum(p.numel() for name, p in model.named_parameters()
                 if name.startswith(("vision_tower.", "multi_modal_projector.")))
    return ParameterCounts(total, round(total - inactive), routed, dict(kinds), vision)
