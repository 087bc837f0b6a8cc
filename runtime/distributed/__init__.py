"""Distributed runtime core: device layer, meshes, expert parallel, Ulysses, offload, FSDP2.

Typical use (one process per device, launched by torchrun or `testing.spawn`)::

    env = init_distributed(resolve_device_type(plan.hardware))
    meshes = build_meshes(plan.layout, env.device_type)
    model = parallelize(build_model(config, seed=0), plan.layout, meshes)
    batch = local_batch(global_input_ids, meshes)       # this rank's rows / sequence chunk
    result = train_step(model, optimizer, batch.micro_batches(layout.micro_batch), loss_fn,
                        batch.global_tokens, meshes, max_norm)   # xplan.runtime.train.step
    shutdown_distributed()

See `parallelize` for the loss-normalisation contract `train_step` follows.
"""

from .device import DistEnv, init_distributed, resolve_device_type, shutdown_distributed
from .expert_parallel import apply_expert_parallel
from .mesh import IGNORE_INDEX, LocalBatch, Meshes, build_meshes, local_batch, shift_labels
from .offload import OffloadLabels, apply_optimizer_offload
from .parallelize import (
    bind_optimizer,
    check_runtime_layout,
    clip_grad_norm_,
    global_loss,
    grad_norm,
    optimizer_parameters,
    parallelize,
    reduce_gradients,
)
from .reshard import set_last_micro_batch
from .ulysses import apply_ulysses
from .zero1 import ZeroOne, zero1_of

__all__ = [
    "IGNORE_INDEX",
    "DistEnv",
    "LocalBatch",
    "Meshes",
    "OffloadLabels",
    "apply_expert_parallel",
    "ZeroOne",
    "apply_optimizer_offload",
    "apply_ulysses",
    "bind_optimizer",
    "build_meshes",
    "check_runtime_layout",
    "clip_grad_norm_",
    "global_loss",
    "grad_norm",
    "init_distributed",
    "local_batch",
    "optimizer_parameters",
    "parallelize",
    "reduce_gradients",
    "resolve_device_type",
    "set_last_micro_batch",
    "shift_labels",
    "shutdown_distributed",
    "zero1_of",
]
