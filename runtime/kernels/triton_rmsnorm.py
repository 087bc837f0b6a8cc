"""RMSNorm forward and backward as one Triton kernel each (`kernels.elementwise: fused` on CUDA).

Same numerics as `runtime/models/layers.py: RMSNorm` (normalise in fp32, round to the input dtype,
scale by the weight in the promoted dtype); float64 inputs accumulate in float64 (tests).
Forward: one program per row writes the output and the row's rstd = 1 / sqrt(mean(x^2) + eps).
Backward: with x̂ = x * rstd and u = w * dy, dx = rstd * (u - x̂ * mean(u * x̂)); each program walks
a run of rows and keeps its own partial dw, summed afterwards (deterministic, no atomics).
Saved for backward: the input and the fp32 rstd per row (torch's ops keep an fp32 copy of the input
and the normalised rows as well).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import accumulator, backward_programs


@triton.jit
def _rmsnorm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, width, eps, x_row_stride,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0)
    xf = x.to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / width + eps)
    normed = (xf * rstd).to(x.dtype)  # rounded to the input dtype, as the torch module does
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    y = normed.to(ACC) * w.to(ACC)
    tl.store(y_ptr + row * width + cols, y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_backward(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, width, rows_per_program,
                      x_row_stride, dy_row_stride, BLOCK: tl.constexpr, ACC: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)  # row offsets in int64: rows x width may pass 2^31
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK], dtype=ACC)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for row in range(first, last):
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=inside, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x.to(ACC) * rstd
        u = w * dy
        dx = rstd * (u - x_hat * (tl.sum(u * x_hat, axis=0) / width))
        tl.store(dx_ptr + row * width + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        dw += dy * x_hat.to(x.dtype).to(ACC)
    tl.store(dw_partial_ptr + program * width + cols, dw, mask=inside)


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rows_in = x.reshape(-1, width)
        if rows_in.stride(-1) != 1:
            rows_in = rows_in.contiguous()
        acc_torch, acc = accumulator(x.dtype)
        # Allocated in the output's own shape: the result is a fresh tensor, never a view.
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows_in.shape[0], dtype=acc_torch, device=x.device)
        if rows_in.shape[0]:
            _rmsnorm_forward[(rows_in.shape[0],)](rows_in, weight, out, rstd, width, eps, rows_in.stride(0),
                                                  BLOCK=triton.next_power_of_2(width), ACC=acc)
        ctx.save_for_backward(rows_in, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows_in, weight, rstd = ctx.saved_tensors
        rows, width = rows_in.shape
        dy = grad.reshape(-1, width)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        acc_torch, acc = accumulator(rows_in.dtype)
        dx = torch.empty(grad.shape, dtype=rows_in.dtype, device=grad.device)
        programs = backward_programs(rows, grad.device)
        partial = torch.zeros(max(programs, 1), width, dtype=acc_torch, device=grad.device)
        if rows:
            per_program = -(-rows // programs)
            _rmsnorm_backward[(programs,)](rows_in, weight, dy, rstd, dx, partial, rows, width, per_program,
                                           rows_in.stride(0), dy.stride(0), BLOCK=triton.next_power_of_2(width),
                                           ACC=acc)
        return dx, partial.sum(0).to(weight.dtype), None


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The `RMSNorm.kernel` signature: y = weight * x / sqrt(mean(x^2) + eps) over the last dim."""
    return TritonRMSNorm.apply(x, weight, eps)


__all__ = ["TritonRMSNorm", "triton_rms_norm"]
