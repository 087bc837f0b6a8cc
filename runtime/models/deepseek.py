"""DeepSeek-V3 / Kimi K2 mixture of experts: sigmoid router with group-limited top-k and a
selection bias, stacked routed experts, and always-on shared experts.

Routing ("noaux_tc"): scores = sigmoid(gate(x)) in fp32. The per-expert `e_score_correction_bias`
(a persistent buffer, updated outside the gradient by load balancing) is added for *selection
only*: experts are split into `n_group` groups, a group's score is the sum of its two best biased
scores, the best `topk_group` groups stay eligible, and the `top_k` best biased experts among them
are chosen. Their *unbiased* scores are the combine weights, renormalised to sum 1 when
`norm_topk_prob` and then scaled by `routed_scaling_factor`. Every step has a static shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import SwiGLU
from .moe import MoE, SwiGLUExperts


class SigmoidGroupTopKRouter(nn.Module):
    """router(x [T, hidden]) -> (weights [T, top_k] in x's dtype, expert ids [T, top_k])."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float):
        super().__init__()
        if num_experts % n_group:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of n_group ({n_group})")
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        # Kept in fp32 whatever the model dtype (see `_apply`), as in the reference checkpoints.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` must not round the selection bias: its updates are tiny.
        super()._apply(fn, recurse)
        bias = self.e_score_correction_bias
        if bias.is_floating_point() and bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.float()
        return self

    def group_mask(self, biased: torch.Tensor) -> torch.Tensor | None:
        """[T, E] bool mask of the experts in each token's `topk_group` best groups (None: all)."""
        if self.n_group <= 1 or self.topk_group >= self.n_group:
            return None
        tokens = biased.shape[0]
        per_group = self.num_experts // self.n_group
        grouped = biased.view(tokens, self.n_group, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, G]
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
        return keep.unsqueeze(-1).expand(tokens, self.n_group, per_group).reshape(tokens, self.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E], fp32
        biased = scores + self.e_score_correction_bias.float()
        keep = self.group_mask(biased)
        if keep is not None:
            biased = biased.masked_fill(~keep, float("-inf"))
        ids = biased.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return weights.to(x.dtype), ids


def build_deepseek_moe(config: ModelConfig) -> MoE:
    """The MoE block of one DeepSeek-V3 MoE layer (dense layers use `SwiGLU` with intermediate_size)."""
    hidden, experts = config.hidden_size, config.num_experts
    router = SigmoidGroupTopKRouter(
        hidden, experts, config.top_k, config.n_group, config.topk_group,
        config.norm_topk_prob, config.routed_scaling_factor,
    )
    routed = SwiGLUExperts(experts, hidden, config.moe_intermediate_size)
    shared = None
    if config.num_shared_experts > 0:
        shared = SwiGLU(hidden, config.moe_intermediate_size * config.num_shared_experts)
    return MoE(router, routed, experts, config.top_k, shared_experts=shared, router_name="gate")
