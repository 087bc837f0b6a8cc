"""The device layer: which accelerator a run uses and how its process group comes up.

Device types and their collective backends:

==========  ========  ==========================================================
device      backend   notes
==========  ========  ==========================================================
``cuda``    nccl      one GPU per process, chosen by ``LOCAL_RANK``
``npu``     hccl      Ascend through ``torch_npu``, imported only when asked for
``cpu``     gloo      tests and small runs; every collective the runtime uses
==========  ========  ==========================================================

The device type comes from the plan's hardware profile (``device.kind``: gpu → cuda, npu →
npu, cpu → cpu) unless overridden (argument or the ``XPLAN_DEVICE`` environment variable).
`init_distributed` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and always sets a collective timeout, so a rank that dies or
diverges makes the others fail instead of hanging forever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from xplan.errors import InputError

log = logging.getLogger("xplan.runtime.distributed")

DEVICE_TYPES = ("cuda", "npu", "cpu")
BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
_PROFILE_KIND_TO_DEVICE = {"gpu": "cuda", "npu": "npu", "cpu": "cpu"}
DEFAULT_TIMEOUT_S = 600.0


def _import_torch_npu() -> None:
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError as exc:
        raise InputError(
            "device 'npu' needs torch_npu; install the Ascend extra (`pip install xplan[npu]` with the "
            "matching CANN toolkit) or choose another device with --device / XPLAN_DEVICE."
        ) from exc


def resolve_device_type(hardware: object | None = None, override: str | None = None) -> str:
    """The torch device type ('cuda' | 'npu' | 'cpu') for a run.

    Priority: `override` argument, then the ``XPLAN_DEVICE`` environment variable, then the
    hardware profile (a loaded profile, a shipped profile name or a profile YAML path): its
    ``device.kind`` decides, and a profile named like ``cpu*`` means cpu. Without any of those:
    cuda when available, else cpu.
    """
    choice = override or os.environ.get("XPLAN_DEVICE") or None
    if choice:
        choice = choice.lower()
        if choice == "gpu":
            choice = "cuda"
        if choice not in DEVICE_TYPES:
            raise InputError(f"device must be one of {', '.join(DEVICE_TYPES)}, got {choice!r}.")
        return choice
    if hardware is not None:
        kind = getattr(getattr(hardware, "device", None), "kind", None)
        if kind is None:
            name = str(hardware)
            try:
                from xplan.hw_profiles import load_profile

                kind = load_profile(name).device.kind
            except Exception:  # noqa: BLE001 - fall back to the name when the profile cannot be read
                lowered = os.path.basename(name).lower()
                kind = "cpu" if lowered.startswith("cpu") else None
        if kind in _PROFILE_KIND_TO_DEVICE:
            return _PROFILE_KIND_TO_DEVICE[kind]
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_module(device_type: str):
    """`torch.cuda` / `torch.npu` (None for cpu)."""
    if device_type == "npu":
        _import_torch_npu()
        return torch.npu  # type: ignore[attr-defined]
    if device_type == "cuda":
        return torch.cuda
    return None


@dataclass(frozen=True)
class DistEnv:
    """What `init_distributed` set up."""

    rank: int
    world_size: int
    local_rank: int
    device_type: str
    device: torch.device
    backend: str


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name} must be an integer, got {value!r}.") from None


def _restarted_attempt_store(world: int, timeout_s: float):
    """Under torchrun's shared rendezvous store, the store of a restarted attempt, keyed apart.

    torchrun (c10d rendezvous) hands every attempt the same agent-hosted TCPStore and, trusting a
    fresh store per retry, adds no per-attempt prefix; the process groups' keys of the attempt that
    died (Gloo's listening addresses among them) are still there, and a restarted rank that reads
    its peer's stale address waits out the connect timeout (seen: "Gloo connectFullMesh failed ...
    Connect timeout" 300 s after a restart). Each restarted attempt therefore gets its own prefix.
    None (torch's default store) for a first attempt or outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 29500), world, is_master=False,
                          timeout=timedelta(seconds=float(timeout_s)))
    return dist.PrefixStore(f"xplan/attempt_{attempt}", store)


def init_distributed(device_type: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Bring up the default process group from the torchrun environment (idempotent).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (defaults 0, 1, 0) and ``MASTER_ADDR`` /
    ``MASTER_PORT`` (a single process without them rendezvouses in memory, no port). Selects the local device
    (``cuda:LOCAL_RANK`` / ``npu:LOCAL_RANK`` / ``cpu``) and the backend for it; every collective
    gets `timeout_s`. A single process (WORLD_SIZE 1) still gets a process group, so the same
    runtime code runs at world size 1.
    """
    if device_type not in DEVICE_TYPES:
        raise InputError(f"device must be one of {', '.join(DEVICE_TYPES)}, got {device_type!r}.")
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise InputError(f"RANK ({rank}) must be in [0, WORLD_SIZE ({world})).")
    backend = BACKENDS[device_type]
    module = device_module(device_type)
    if module is not None:
        if not module.is_available():
            raise InputError(f"device {device_type!r} was chosen but no {device_type} device is available; "
                             "choose --device cpu or run on a machine with the accelerator.")
        count = module.device_count()
        if local_rank >= count:
            raise InputError(f"LOCAL_RANK {local_rank} but only {count} {device_type} device(s) are visible.")
        module.set_device(local_rank)
        device = torch.device(device_type, local_rank)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device_type, device,
                       dist.get_backend())
    kwargs: dict = {}
    if world == 1 and not os.environ.get("MASTER_PORT"):
        kwargs["store"] = dist.HashStore()  # a lone process needs no rendezvous port
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        attempt_store = _restarted_attempt_store(world, timeout_s)
        if attempt_store is not None:
            kwargs["store"] = attempt_store
    if device_type == "cuda":
        kwargs["device_id"] = device  # eager NCCL communicator bound to this GPU (enables group splitting)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=float(timeout_s)), **kwargs)
    log.info("rank %d/%d: %s process group on %s (timeout %.0f s)", rank, world, backend, device, timeout_s)
    return DistEnv(rank, world, local_rank, device_type, device, backend)


def shutdown_distributed() -> None:
    """Destroy every process group (safe to call twice); meshes built before become unusable."""
    from .mesh import clear_mesh_cache

    clear_mesh_cache()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["BACKENDS", "DEVICE_TYPES", "DistEnv", "device_module", "init_distributed", "resolve_device_type",
           "shutdown_distributed"]
