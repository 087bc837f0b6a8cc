"""Dropless mixture-of-experts block: route -> sort tokens by expert -> grouped GEMM -> combine.

Every step uses static shapes (argsort, histc, grouped GEMM offsets) so the same code runs under
fake tensors for tracing and dry runs. Expert parallelism later replaces `dispatch`/`combine`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import grouped_linear


class SoftmaxTopKRouter(nn.Module):
    """Qwen3-MoE: softmax over all experts in fp32, top-k, optional renormalisation."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids


class SwiGLUExperts(nn.Module):
    """Routed experts stacked as [experts, out, in] so one grouped GEMM serves them all."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.grouped_gemm = "auto"

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        impl = self.grouped_gemm
        gate = grouped_linear(x_sorted, self.gate_proj, tokens_per_expert, impl)
        up = grouped_linear(x_sorted, self.up_proj, tokens_per_expert, impl)
        return grouped_linear(F.silu(gate) * up, self.down_proj, tokens_per_expert, impl)

    # Checkpoints store one Linear per expert: `experts.{e}.gate_proj.weight`.
    def hf_keys_to_local(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        num_experts = self.gate_proj.shape[0]
        out = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"{prefix}{e}.{proj}.weight" for e in range(num_experts)]
            if all(k in tensors for k in keys):
                out[prefix + proj] = torch.stack([tensors.pop(k) for k in keys])
        return out

    def local_to_hf(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}{e}.{proj}.weight": getattr(self, proj)[e]
            for proj in ("gate_proj", "up_proj", "down_proj")
            for e in range(self.gate_proj.shape[0])
        }


class MoE(nn.Module):
    """Router + routed experts (+ optional shared expert). Subclasses only swap parts."""

    def __init__(self, router: nn.Module, experts: nn.Module, num_experts: int, top_k: int,
                 shared_experts: nn.Module | None = None, router_name: str = "gate"):
        super().__init__()
        # HF names the router `gate` (Qwen3-MoE, DeepSeek-V3) or `router` (GPT-OSS).
        self.router_name = router_name
        self.add_module(router_name, router)
        self.experts = experts
        if shared_experts is not None:
            self.shared_experts = shared_experts
        self.num_experts, self.top_k = num_experts, top_k
        # A fused permutation (`permute(x, ids, experts, top_k)` / `unpermute(y, weights, handle)`)
        # set by the kernel registry (runtime/kernels); None runs the torch ops below.
        self.token_permuter = None

    @property
    def router(self) -> nn.Module:
        # Read the registered submodule directly: when router_name is "router" a getattr would
        # recurse into this property (and add_module probes the name before registering it).
        try:
            return self._modules[self.router_name]
        except KeyError:
            raise AttributeError(self.router_name) from None

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor):
        """Sort token copies by expert. Returns (x_sorted, tokens_per_expert, order); `order` is
        opaque to callers (expert parallelism passes it back to `combine`)."""
        if self.token_permuter is not None:
            return self.token_permuter.permute(x, expert_ids, self.num_experts, self.top_k)
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens_per_expert = torch.histc(flat.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        x_sorted = x[order // self.top_k]
        return x_sorted, tokens_per_expert.to(torch.int64), order

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Undo the sort and sum each token's k expert outputs in token order, weighted."""
        if self.token_permuter is not None:
            return self.token_permuter.unpermute(y_sorted, weights, order)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
        y = y.view(weights.shape[0], self.top_k, y_sorted.shape[-1])  # -1 is ambiguous with zero tokens
        return (y * weights.unsqueeze(-1)).sum(dim=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights, ids = self.router(x)
        x_sorted, tokens_per_expert, order = self.dispatch(x, ids)
        y_sorted = self.experts(x_sorted, tokens_per_expert)
        # Permuted buffers go as soon as their consumer has run (autograd keeps what backward needs).
        del x_sorted
        out = self.combine(y_sorted, weights, order)
        del y_sorted
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.view(shape)
