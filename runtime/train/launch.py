"""Launching a plan: under torchrun (read the environment) or, on one machine, by spawning the
plan's world size of worker processes and collecting rank 0's results.

Failure handling: a worker that raises writes its error to the run's scratch directory and exits
non-zero; torch.multiprocessing then terminates the other workers (which may be blocked in a
collective) and the parent re-raises the first error: `InputError` stays an InputError (exit 2),
anything else becomes a RuntimeError carrying the worker's message (exit 1). Collectives have a
timeout (`RunOptions.timeout_s`), so a rank that hangs is bounded as well: the ranks that see a
collective fail raise `peers.PeerFailure` naming the rank that fell behind, reported without a
traceback when no rank has an error of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from xplan.errors import InputError
from xplan.processes import exit_worker, under_torchrun

from . import manifest, resume
from .checkpoint import latest_checkpoint
from .data import build_data, check_data_settings
from .loop import RunOptions, check_plan_for_runtime, load_run_plan, train

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def device_type_for(hardware: str, override: str | None = None) -> str:
    """'cpu', 'cuda' or 'npu': the --device override (or XPLAN_DEVICE), else the plan's hardware
    profile's device kind (a profile named cpu* runs on CPU)."""
    from xplan.runtime.distributed import resolve_device_type

    return resolve_device_type(hardware, override)


# Processes per core a CPU run may start: gloo tolerates some oversubscription (the tests run 4
# ranks on 2 cores), but 64 ranks on 2 cores only crawl until a collective times out.
CPU_RANKS_PER_CORE = 2
HOST_MEMORY_FRACTION = 0.9  # of MemAvailable a CPU run may plan to use
CPU_BYTES_PER_PARAM = 4 + 16  # the fp32 model each rank builds before sharding + its shard's states


def _available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_cpu_capacity(plan, local_world: int) -> None:
    """A CPU run fits this machine's cores and memory before any process starts."""
    cores = os.cpu_count() or 1
    limit = max(4, CPU_RANKS_PER_CORE * cores)
    if local_world > limit:
        raise InputError(f"the plan starts {local_world} ranks on this machine's {cores} CPU cores (at most "
                         f"{limit} here): use a plan for fewer devices (`xplan whatif PLAN --set devices=N` "
                         "prices one), or launch with torchrun across nodes.")
    from xplan.runtime import build_model, load_config
    from xplan.runtime.models.counting import count_parameters

    params = count_parameters(build_model(load_config(plan.model), device="meta")).total
    fsdp = max(1, plan.layout.fsdp)
    need = local_world * params * (4 + (CPU_BYTES_PER_PARAM - 4) / fsdp)
    available = _available_host_bytes()
    if available is not None and need > HOST_MEMORY_FRACTION * available:
        raise InputError(f"the plan's {local_world} ranks need about {need / 2**30:.1f} GiB of host memory for "
                         f"{params / 1e6:.1f}M parameters (fp32 model, gradients and AdamW states) but "
                         f"{available / 2**30:.1f} GiB is available: use a smaller model or fewer ranks.")


def check_host_offload(plan, local_world: int) -> None:
    """An offload plan's host bytes (the plan's predictions, per rank) fit this node's host memory:
    every local rank pins its copies there."""
    memory = (plan.data.predictions or {}).get("memory_gib") or {}
    per_rank = memory.get("offloaded_to_host") if isinstance(memory, dict) else None
    available = _available_host_bytes()
    if not plan.layout.offload or not isinstance(per_rank, (int, float)) or available is None:
        return
    need = per_rank * 2**30 * local_world
    if need > HOST_MEMORY_FRACTION * available:
        raise InputError(f"the plan offloads {per_rank:.1f} GiB per rank to host memory; its {local_world} ranks on "
                         f"this node need {need / 2**30:.1f} GiB but {available / 2**30:.1f} GiB is available: offload "
                         "less (`xplan whatif PLAN --set offload=...`) or use a profile whose host.memory_gib matches "
                         "this machine.")


def check_device(device_type: str, hardware: str, local_world: int, plan=None) -> None:
    if device_type == "cpu":
        if plan is not None:
            check_cpu_capacity(plan, local_world)
        return
    if device_type == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise InputError(f"the run targets Ascend NPUs (from --device, XPLAN_DEVICE or the plan's hardware "
                             f"{hardware!r}) but torch_npu is not installed (pip install 'xplan[npu]'); pass "
                             "--device cpu to run the plan on CPU here.") from None
    module = getattr(torch, device_type)
    count = module.device_count() if module.is_available() else 0
    if count == 0:
        raise InputError(f"the run targets {device_type} devices (from --device, XPLAN_DEVICE or the plan's hardware "
                         f"{hardware!r}) but this machine has no {device_type} device; pass --device cpu to run "
                         "the plan on CPU (gloo).")
    if local_world > count:
        raise InputError(f"the plan needs {local_world} {device_type} devices on this machine but it has {count}; "
                         "launch with torchrun across nodes, or use a plan for fewer devices.")
    if plan is not None:
        check_host_offload(plan, local_world)


def preflight(plan, options: RunOptions, plan_dir: Path | None) -> RunOptions:
    """Everything that can be checked before any process starts (each raises InputError); returns
    the options with the resume point chosen."""
    config = check_plan_for_runtime(plan, options.device_type)
    check_data_settings(plan.training.data, plan_dir)
    if plan.training.data.kind == "image_jsonl":  # reads every sample and image header (bad input: exit 2 here)
        build_data(plan.training.data, config.vocab_size, plan.training.seq_len, plan_dir, plan.training.image_tokens,
                   config.vision_spec, plan.training.image_fraction)
    if options.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be >= 0, got {options.checkpoint_every}.")
    if options.checkpoint_every and not options.checkpoint_dir:
        raise InputError("--checkpoint-every needs --checkpoint-dir (where to write the checkpoints).")
    if options.steps is not None and options.steps < 1:
        raise InputError(f"--steps must be at least 1, got {options.steps}.")
    resume.prepare_directory(options.checkpoint_dir, options.resume, options.overwrite,
                             remove=int(os.environ.get("RANK", "0")) == 0)
    if options.resume and int(os.environ.get("RANK", "0")) == 0:  # rank 0 verifies; the others follow it
        point = resume.choose(options.checkpoint_dir, manifest.model_fingerprint(config),
                              plan.training.model_dump(mode="json"), options.accept_plan_changes)
        return dataclasses.replace(options, resume_point=point)
    return options


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _worker(local_rank: int, plan_path: str, options: RunOptions, world: int, port: int, scratch: str) -> None:
    """Entry point of a spawned worker (top level so it pickles)."""
    os.environ.update(_rank_env(local_rank, world, port))
    if options.device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if local_rank != 0:
        options = RunOptions(**{**options.__dict__, "live": False})
    faulthandler.enable()  # a rank killed by a signal leaves its Python stack on stderr
    try:
        plan = load_run_plan(plan_path)
        summary = train(plan, options, Path(plan_path).resolve().parent)
        if local_rank == 0:
            _write_json(Path(scratch) / "result.json", summary)
    except BaseException as exc:
        kind = "input" if isinstance(exc, InputError) else "runtime"
        _write_json(Path(scratch) / f"error_rank{local_rank}.json",
                    {"kind": kind, "type": type(exc).__name__, "message": str(exc), "time": time.time(),
                     "rank": local_rank, "traceback": traceback.format_exc()})
        raise
    exit_worker(0)  # train destroyed the process groups; skip the finalization that can abort gloo


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _raise_worker_error(scratch: Path, cause: BaseException) -> None:
    errors = []
    for path in scratch.glob("error_rank*.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            errors.append(json.loads(path.read_text()))
    if not errors:
        raise RuntimeError(f"a worker process died without reporting an error ({cause}); "
                           "it may have been killed (out of memory?).") from None
    # A rank's own error first; a rank that only saw its peer fail (PeerFailure) explains the rest.
    errors.sort(key=lambda e: (e["kind"] != "input", e["type"] == "PeerFailure", e["time"]))
    first = errors[0]
    if first["kind"] == "input":
        raise InputError(first["message"]) from None
    if first["type"] == "PeerFailure" and not os.environ.get("XPLAN_DEBUG"):
        raise RuntimeError(first["message"]) from None
    tail = first["traceback"].strip().splitlines()[-6:]
    if os.environ.get("XPLAN_DEBUG"):
        tail = first["traceback"].strip().splitlines()
    raise RuntimeError(f"rank {first['rank']} failed: {first['type']}: {first['message']}\n  " + "\n  ".join(tail)) \
        from None


SHUTDOWN_GRACE_S = 5.0


def spawn(plan_path: Path, options: RunOptions, world: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="xplan-run-") as scratch:
        port = free_port()
        try:
            context = mp.start_processes(_worker, args=(str(plan_path), options, world, port, scratch),
                                         nprocs=world, join=False, start_method="spawn")
            # Once one rank fails, the others get SHUTDOWN_GRACE_S to report their own errors, then
            # SIGTERM, then SIGKILL after as long again (a stopped rank ignores SIGTERM).
            while not context.join(grace_period=SHUTDOWN_GRACE_S):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            _raise_worker_error(Path(scratch), exc)
        result = Path(scratch) / "result.json"
        if not result.is_file():
            raise RuntimeError("rank 0 finished without writing its results.")
        return json.loads(result.read_text())


def run_plan(plan_path: str | Path, options: RunOptions) -> dict[str, Any] | None:
    """Execute a plan file. Returns rank 0's summary (None on other torchrun ranks)."""
    plan_path = Path(plan_path)
    plan = load_run_plan(plan_path)
    plan_dir = plan_path.resolve().parent
    world = plan.layout.ranks  # devices × the hardware's ranks per device (a3: one rank per die)
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world:
            raise InputError(f"the plan runs on {plan.layout.ranks_text()} but torchrun started "
                             f"WORLD_SIZE={env_world} processes; launch with a total of {world} processes or use a "
                             f"plan for {env_world}.")
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts and options.checkpoint_dir and latest_checkpoint(Path(options.checkpoint_dir)):
            # torchrun --max-restarts brought the job back after a failure: continue the run.
            options = dataclasses.replace(options, resume=True)
        options = preflight(plan, options, plan_dir)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        check_device(options.device_type, plan.hardware, local_world, plan)
        if int(os.environ.get("RANK", 0)) != 0:
            options = RunOptions(**{**options.__dict__, "live": False})
        return train(plan, options, plan_dir)
    options = preflight(plan, options, plan_dir)
    check_device(options.device_type, plan.hardware, world, plan)
    if world == 1:
        with _env(_rank_env(0, 1, free_port())):
            return train(plan, options, plan_dir)
    return spawn(plan_path, options, world)
