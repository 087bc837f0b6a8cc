"""`xplan calibrate`'s measurements: this machine timed into the data a hardware profile is built from.

What is measured (every timing is the median of ``repeats`` loops of at least ``min_time`` s,
after warm-up, with the device synchronised around each loop; the spread is kept):

- **GEMMs**: ``torch.mm`` over a sweep of shapes (square, skinny, small) in the three operand
  layouts a linear layer runs (``x @ W^T`` forward, ``g @ W`` and ``g^T @ x`` backward), with a
  fresh output each call (what eager training does), plus small **grouped** GEMMs (MoE experts)
  through ``torch._grouped_mm`` where the device supports it, else one ``mm`` per expert. The
  profile's per-dtype peak is fitted to the whole sweep with the cost model's own GEMM formula.
- **Per-kernel overhead**: a chain of tiny elementwise ops run forward and backward under
  autograd, divided by the number of aten ops it dispatches (counted the way the planner's tracer
  counts them): what one eager kernel costs beyond its bytes (dispatch, autograd, launch).
- **Memory bandwidth**: out-of-place elementwise ops with fresh outputs over a sweep of sizes
  (fitted ``t = bytes / bw``), and a STREAM-style ``copy_`` (reported, and the nominal medium of
  the local interconnect on CPU).
- **Attention**: causal ``scaled_dot_product_attention`` forward and backward over sequence
  lengths, in model FLOPs (causal half, backward = 2 x forward), fitted ``max*s/(s+half)``.
- **Host <-> device**: pinned copies both ways on an accelerator; on CPU host and device are the
  same memory, so the host link is the RAM copy bandwidth (said so in ``sources``).
- **Collectives**: ``all_gather``, ``reduce_scatter``, ``all_reduce``, ``all_to_all`` and
  ``p2p`` through torch.distributed between N local processes (gloo on CPU, nccl on CUDA, hccl on
  Ascend) over a sweep of sizes; per kind an alpha-beta fit (latency per ring step, bus
  bandwidth), and one shared latency for the level.

What one "device" is: one rank of ``xplan run`` with ``processes`` ranks on this machine. On CPU
each rank gets ``threads`` (default ``cores // processes``, what ``xplan run`` gives each spawned
rank; all cores at one process) and the ranks run the compute sweep *concurrently*, so shared
memory bandwidth and caches are measured as a real N-rank run sees them. A profile is therefore
specific to its process count: calibrate with ``--processes N`` for N-rank runs.

Accelerators (CUDA, Ascend NPU) are chosen automatically when present; those paths are short
and are not exercised on CPU-only machines.

The package measures and assembles; the fitting lives with the formulas it inverts
(``xplan.cost_models.fit``), and ``xplan calibrate`` joins the three::

    setup, name = prepare(processes=2)        # sweeps: options checked, defaults resolved
    data = measure(setup)                     # workers: benches and collectives on every rank
    fitted = fit_calibration(data, setup.device == "cpu")   # xplan.cost_models.fit
    calibration = build_profile(data, setup, fitted, name)  # build: the sourced profile
"""

from __future__ import annotations

from .benches import (
    AttentionResult,
    MatmulResult,
    grouped_mm_works,
    measure_attention,
    measure_copy_bandwidth,
    measure_elementwise,
    measure_grouped,
    measure_host_link,
    measure_kernel_overhead,
    measure_matmul,
)
from .build import Calibration, Fitted, build_profile
from .collectives import backend_for, measure_collectives_here
from .sweeps import Setup, Sweep, prepare, sweep_for
from .timing import DEVICE_TYPES, Timing, accelerator_count, default_name, pick_device, time_fn
from .workers import Progress, measure

__all__ = [
    "DEVICE_TYPES",
    "AttentionResult",
    "Calibration",
    "Fitted",
    "MatmulResult",
    "Progress",
    "Setup",
    "Sweep",
    "Timing",
    "accelerator_count",
    "backend_for",
    "build_profile",
    "default_name",
    "grouped_mm_works",
    "measure",
    "measure_attention",
    "measure_collectives_here",
    "measure_copy_bandwidth",
    "measure_elementwise",
    "measure_grouped",
    "measure_host_link",
    "measure_kernel_overhead",
    "measure_matmul",
    "pick_device",
    "prepare",
    "sweep_for",
    "time_fn",
]
