"""A dead or stopped peer: turn a failed collective into a message that names the problem.

When a rank dies (its sockets close) or stops (it never answers), the other ranks' next collective
fails: at once with a closed connection, or after the collective timeout (`--timeout`). The
backend's error says neither which rank nor what to do. Each rank therefore marks the steps it
finishes in the process group's key-value store (`mark`); `explain` turns a collective failure into
a `PeerFailure` naming this rank, the step it was in, the ranks that fell behind (from their marks;
a rank whose marks cannot be read is named as unreachable) and what to do next.
"""

from __future__ import annotations

import re
from datetime import timedelta

import torch.distributed as dist

_KEY = "xplan/finished_step/{rank}"
# Backend messages of a collective that lost its peer (gloo, NCCL, HCCL) or waited past its timeout.
_PEER_LOST = re.compile(r"timed? ?out|timeout|connection (closed|reset|refused)|broken pipe|peer|"
                        r"socket|remote process|watchdog|aborted", re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed? ?out|timeout|watchdog", re.IGNORECASE)
_STORE_TIMEOUT_S = 3.0


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, stopped or hung."""


def _store():
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def mark(rank: int, step: int) -> None:
    """Note that `rank` finished `step` (a no-op in a single process)."""
    store = _store()
    if store is not None:
        store.set(_KEY.format(rank=rank), str(step))


def _is_collective_failure(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and not isinstance(exc, PeerFailure) and bool(_PEER_LOST.search(str(exc)))


def _progress(rank: int, world: int) -> tuple[dict[int, int], str | None]:
    """{rank: last finished step} of the other ranks, and why it could not be read (if so)."""
    store = _store()
    if store is None:
        return {}, "the process group's store is gone"
    try:
        store.set_timeout(timedelta(seconds=_STORE_TIMEOUT_S))
        steps = {}
        for other in range(world):
            key = _KEY.format(rank=other)
            if other != rank:
                steps[other] = int(store.get(key)) if store.check([key]) else 0
        return steps, None
    except Exception as exc:  # noqa: BLE001 - the store lives in a process that may be dead too
        return {}, f"the rendezvous store is unreachable ({type(exc).__name__}); rank 0's process hosts it"


def explain(exc: BaseException, rank: int, world: int, step: int, timeout_s: float) -> PeerFailure | None:
    """A `PeerFailure` for a collective that failed during `step` (1-based) on `rank`, or None
    when `exc` is not a collective failure (or there are no peers)."""
    if world < 2 or not _is_collective_failure(exc):
        return None
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    what = (f"a collective timed out after {timeout_s:g} s" if _TIMED_OUT.search(str(exc))
            else "a collective lost its connection to a peer")
    steps, unreadable = _progress(rank, world)
    if unreadable:
        who = f"Which rank failed is unknown: {unreadable}."
    else:
        behind = sorted(r for r, s in steps.items() if s < step - 1)
        if behind:
            who = "Behind this rank: " + ", ".join(f"rank {r} (last finished step {steps[r]})" for r in behind) + "."
        elif len(steps) == 1:
            (other, done), = steps.items()
            who = f"The other rank, rank {other}, finished step {done} and did not answer in step {step}."
        else:
            who = (f"Every other rank finished step {step - 1}; one of them died or stopped during step {step} "
                   "(their marks cannot tell which).")
    return PeerFailure(
        f"rank {rank} of {world}: {what} during step {step}; another rank died, was stopped or hangs. {who} "
        f"The other ranks' own errors, if any, say why. Resume with --resume from the last checkpoint; raise "
        f"--timeout if the ranks are only slow. (backend: {type(exc).__name__}: {first_line})")
