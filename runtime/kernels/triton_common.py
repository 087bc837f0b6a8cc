"""What the Triton kernels share: the accumulation dtype and launch sizes."""

from __future__ import annotations

import functools

import torch
import triton.language as tl


def accumulator(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """(torch dtype, Triton dtype) to accumulate in: fp32, or fp64 for fp64 inputs (tests)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(rows: int, device: torch.device) -> int:
    """Programs for a reduction over rows: a few per multiprocessor on CUDA, 4 elsewhere (the
    interpreter), never more than the rows."""
    if device.type == "cuda":
        target = 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(rows, target))


def pow2_at_least(n: int, floor: int = 1) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


__all__ = ["accumulator", "backward_programs", "pow2_at_least"]
