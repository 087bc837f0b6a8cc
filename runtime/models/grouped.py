"""The grouped expert GEMM: one interface, a loop reference and a `torch._grouped_mm` path.

Interface: `grouped_linear(x_sorted, weight, tokens_per_expert)` where `x_sorted` is [tokens, in]
with rows sorted by expert, `weight` is [experts, out, in] (nn.Linear layout per expert) and
`tokens_per_expert` is [experts] (int). Returns [tokens, out].
"""

from __future__ import annotations

import torch

from ..compat import grouped_mm, is_fake

GROUPED_GEMM_IMPLS = ("auto", "grouped_mm", "loop")


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm needs matching dtypes and 16-byte aligned row strides."""
    if not hasattr(torch, "_grouped_mm") or x.dim() != 2 or weight.dim() != 3 or x.dtype != weight.dtype:
        return False
    size = x.element_size()
    return (
        x.is_contiguous()
        and weight.is_contiguous()
        and (weight.shape[1] * size) % 16 == 0
        and (weight.shape[2] * size) % 16 == 0
    )


class _GroupedLinear(torch.autograd.Function):
    """`x @ weight[e].T` per expert row group with torch._grouped_mm, forward and backward.

    Written out (the backward is the same two grouped GEMMs autograd would run) for two reasons:
    the output is a fresh tensor, never a view, so FSDP2's pre-backward hook on an expert unit's
    output cannot be dropped by a later in-place op; and the incoming gradient is made contiguous
    first (grouped_mm rejects stride-0 gradients such as the one `out.sum().backward()` produces).
    """

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return grouped_mm(x, weight.transpose(-2, -1), offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad, weight, offsets)
        if ctx.needs_input_grad[1]:
            # [out, tokens] @ [tokens, in] split along the tokens: one [out, in] block per expert.
            grad_w = grouped_mm(grad.transpose(0, 1), x, offsets)
        return grad_x, grad_w, None


def grouped_linear_loop(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert. Needs the counts on the host."""
    counts = tokens_per_expert.tolist()
    outs = [chunk @ weight[e].t() for e, chunk in enumerate(torch.split(x, counts, dim=0))]
    if not outs:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(outs, dim=0)


def grouped_linear_mm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """One `torch._grouped_mm` call over all experts; static shapes, works under fake tensors."""
    offsets = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)
    return _GroupedLinear.apply(x, weight, offsets)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    if impl == "loop" and not is_fake(x):
        return grouped_linear_loop(x, weight, tokens_per_expert)
    # Fake tensors (the tracer, the dry run) have no counts to split by: the loop's shapes are
    # the grouped call's (runtime.compat.fake_grouped_mm gives them where the meta kernel refuses).
    if impl in ("grouped_mm", "loop") or is_fake(x) or (impl == "auto" and grouped_mm_supported(x, weight)):
        return grouped_linear_mm(x, weight, tokens_per_expert)
    if impl == "auto":
        return grouped_linear_loop(x, weight, tokens_per_expert)
    raise ValueError(f"grouped GEMM impl must be one of {GROUPED_GEMM_IMPLS}, got {impl!r}")
