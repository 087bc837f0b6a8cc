"""Leaving a worker process that used a gloo process group, and knowing that this process is one
(a torchrun worker, or a rank `xplan run` spawned).

Gloo's worker threads can still hold work objects with Python references after the process
groups are destroyed, and tearing those down while the interpreter shuts down aborts the process
(SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291). It failed CI
runs after every rank had finished its work and rank 0 had written its results. A worker that is
done therefore leaves without interpreter finalization. Imports nothing of xplan: every layer that
spawns ranks (runtime, calibration, the CLI under torchrun) may use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether torchrun (or a launcher setting its environment) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in TORCHRUN_VARS)


def exit_worker(code: int = 0) -> NoReturn:
    """Flush logging and the standard streams, then end the process with `code`, skipping
    interpreter finalization. Call it only once the process groups are destroyed and every file
    the parent reads is written."""
    import logging  # here: the CLI imports this module at start-up

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
