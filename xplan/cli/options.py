"""Command-line options shared by estimate, search and whatif (names from DESIGN.md).

The layout flags are not written here: `layout_options` derives one option per knob of
`xplan.layout.Layout` (flag, type, help) when the command is built, so a knob declared there is
on the command line, in the plan file and among the whatif keys at once.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import typer

SEQ_LEN = typer.Option(4096, "--seq-len", help="Tokens per sequence.")
IMAGE_TOKENS = typer.Option(0, "--image-tokens", help="Image tokens per sample (vision-language models): the "
                            "images they stand for run the vision tower and join the sequence first.")
IMAGES = typer.Option(None, "--images", help="Images per sample (vision-language models): --image-tokens as "
                      "this many times the model's image tokens per image (`xplan inspect`).")
IMAGE_FRACTION = typer.Option(1.0, "--image-fraction", help="Share of samples that carry images (the rest are "
                              "text only): the vision tower's time is priced at the busiest rank's share of a "
                              "micro-batch, its memory at a micro-batch of image samples.")
IMBALANCE = typer.Option(None, "--imbalance", help="Busiest expert-parallel rank's routed load over the mean "
                         "(default: 1.30 for EP >= 32 from UltraEP's measurement, else 1; see cost_models/routing.py).")

LAYOUT_FLAGS = "layout_flags"  # the parameter a decorated command receives the knob values in


def _knob_parameters() -> list[inspect.Parameter]:
    from xplan.layout import knobs

    params = []
    for info in knobs():
        names = [info.flag] + ([info.short] if info.short else [])
        default = ... if info.required else None
        shown = "" if info.required or info.default in (None, ()) else f" (default: {info.default})"
        option = typer.Option(default, *names, help=info.help + shown, show_default=False)
        params.append(inspect.Parameter(info.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[info.kind]))  # noqa: UP045 - typer reads it
    return params


class layout_options:  # noqa: N801 - used as a decorator
    """Give a typer command one option per layout knob; it receives them as `layout_flags`
    ({knob name: value, None where unset}). The signature is computed when typer builds the
    command, from the knobs declared at that moment."""

    def __init__(self, func):
        functools.update_wrapper(self, func)
        self._func = func

    @property
    def __signature__(self) -> inspect.Signature:
        own = [p for p in inspect.signature(self._func, eval_str=True).parameters.values()
               if p.name != LAYOUT_FLAGS]
        positional = [p for p in own if p.default is inspect.Parameter.empty or
                      type(p.default).__name__ == "ArgumentInfo"]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in positional]
        return inspect.Signature(positional + _knob_parameters() + rest)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from xplan.layout import knobs

        flags = {info.name: kwargs.pop(info.name, None) for info in knobs()}
        return self._func(*args, **{LAYOUT_FLAGS: flags}, **kwargs)
