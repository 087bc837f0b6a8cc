"""GPT-OSS mixture-of-experts block: biased top-k router with softmax over the chosen logits, and
clamped SwiGLU experts with biases.

Attention (sinks, alternating sliding window, q/k/v/o biases) lives in `GQAAttention`; the rest of
the decoder is shared with every family.

Expert weights are held stacked as [experts, out, in] (nn.Linear layout per expert) so the one
grouped GEMM serves them:
- `gate_up_weight` [E, 2I, H] with gate and up rows interleaved (row 2j = gate j, row 2j+1 = up j),
  exactly the checkpoint's order, so a contiguous slice of rows (tensor parallel) keeps pairs;
- `gate_up_bias` [E, 2I], `down_weight` [E, H, I], `down_bias` [E, H].
Checkpoints store `experts.gate_up_proj` [E, H, 2I], `experts.gate_up_proj_bias` [E, 2I],
`experts.down_proj` [E, I, H], `experts.down_proj_bias` [E, H]: the weights are transposed on the way
in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .grouped import grouped_linear
from .moe import MoE

DEFAULT_SWIGLU_ALPHA = 1.702


class TopKSoftmaxRouter(nn.Module):
    """Linear router with bias; top-k on the logits, then softmax over the k chosen logits."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight, self.bias)
        top_logits, ids = logits.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return weights.to(x.dtype), ids


def expert_of_rows(tokens_per_expert: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert id of each row of an expert-sorted batch ([num_rows], static shape)."""
    ends = torch.cumsum(tokens_per_expert, dim=0)
    rows = torch.arange(num_rows, device=tokens_per_expert.device, dtype=ends.dtype)
    # Row r belongs to the first expert whose end offset exceeds r (empty experts are skipped).
    return torch.searchsorted(ends, rows, right=True)


class ClampedSwiGLUExperts(nn.Module):
    """GPT-OSS experts: gate/up projection with bias, clamped SwiGLU `(up + 1) * gate * sigmoid(alpha * gate)`,
    down projection with bias."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, limit: float,
                 alpha: float = DEFAULT_SWIGLU_ALPHA):
        super().__init__()
        self.gate_up_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate))
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.limit, self.alpha = limit, alpha
        self.grouped_gemm = "auto"

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        impl = self.grouped_gemm
        expert = expert_of_rows(tokens_per_expert, x_sorted.shape[0])
        gate_up = grouped_linear(x_sorted, self.gate_up_weight, tokens_per_expert, impl)
        h = self.activation(gate_up + self.gate_up_bias[expert])
        return grouped_linear(h, self.down_weight, tokens_per_expert, impl) + self.down_bias[expert]

    # Checkpoint names (relative to the module prefix) and whether the tensor is a transposed weight.
    _HF_NAMES = {
        "gate_up_weight": ("gate_up_proj", True),
        "gate_up_bias": ("gate_up_proj_bias", False),
        "down_weight": ("down_proj", True),
        "down_bias": ("down_proj_bias", False),
    }

    def hf_keys_to_local(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for local, (hf, transposed) in self._HF_NAMES.items():
            key = prefix + hf
            if key in tensors:
                value = tensors.pop(key)
                out[prefix + local] = value.transpose(-2, -1) if transposed else value
        return out

    def local_to_hf(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for local, (hf, transposed) in self._HF_NAMES.items():
            value = getattr(self, local)
            out[prefix + hf] = value.transpose(-2, -1) if transposed else value
        return out


def build_gpt_oss_moe(config: ModelConfig) -> MoE:
    alpha = float(config.hf_dict.get("swiglu_alpha") or DEFAULT_SWIGLU_ALPHA)
    router = TopKSoftmaxRouter(config.hidden_size, config.num_experts, config.top_k)
    experts = ClampedSwiGLUExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                   config.swiglu_limit, alpha)
    return MoE(router, experts, config.num_experts, config.top_k, router_name="router")
