"""A thread-local callback that a tracing aid installs for the length of a `with` block.

The tracer watches what the runtime does without the runtime knowing about the tracer: token
tiles (`models.tiling.observing_tiles`) and loss chunks (`train.loss.representative_chunks`) each
call the observer installed on their thread, if any.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any


class ThreadObserver:
    """One observer slot per thread; `installed(fn)` nests (the previous observer comes back)."""

    def __init__(self) -> None:
        self._state = threading.local()

    def current(self) -> Callable[..., Any] | None:
        return getattr(self._state, "fn", None)

    @contextlib.contextmanager
    def installed(self, fn: Callable[..., Any]):
        previous = self.current()
        self._state.fn = fn
        try:
            yield
        finally:
            self._state.fn = previous
