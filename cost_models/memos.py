"""Keys and a helper for the cost models' memos (issue #14: a search prices thousands of layouts
that share most of their terms).

The memos live on the trace object (`trace.__dict__`), as the cost models' other memos do, so
they go when the trace goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def layout_key(layout, without: tuple[str, ...] = ()) -> tuple:
    """Every field of `layout` but those named in `without`, as a tuple to key memos with (kernels
    given as a dict, which has no hash, become a tuple of items)."""
    return tuple(tuple(value.items()) if type(value) is dict else value
                 for name, value in vars(layout).items() if name not in without)


def memoised(memo: dict, key: tuple, compute: Callable[[], Any]) -> Any:
    """memo[key], computed on a miss; computed every time when the key cannot be hashed."""
    try:
        hit = memo.get(key)
    except TypeError:
        return compute()
    if hit is None:
        hit = memo[key] = compute()
    return hit


def holds(memo: dict, key: tuple) -> bool:
    """Whether `memo` holds `key` (False when the key cannot be hashed: never memoised)."""
    try:
        return key in memo
    except TypeError:
        return False
