"""Generated parts of the repository's docs: the layout-knob table of `docs/plan-schema.md`.

The table is rendered from the one declaration in `xplan.layout` (`knobs()`), so it cannot drift
from what the CLI, the plan file and the runtime accept; `tests/test_docs.py` fails when the
committed table differs from the rendered one. Regenerate it with

    python -m xplan.app.docs --write            # rewrite docs/plan-schema.md between the markers
    python -m xplan.app.docs --check            # exit 1 if the committed table is stale
    python -m xplan.app.docs                    # print the table
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- knobs:begin -->", "<!-- knobs:end -->"
# docs/plan-schema.md of the source tree this module sits in (an editable install or a checkout).
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "plan-schema.md"
REGENERATE = "python -m xplan.app.docs --write"


def _field(info) -> Any:
    """The pydantic FieldInfo behind a knob (kernel slots live on the nested Kernels model)."""
    from xplan.layout import Layout

    model: Any = Layout
    for part in info.path[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[info.path[-1]]


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union annotation (one item for anything else)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _type_name(annotation: Any) -> str:
    names = []
    for member in _members(annotation):
        if typing.get_origin(member) is typing.Annotated:  # a constrained type: name the type itself
            member = typing.get_args(member)[0]
        if member is type(None):
            names.append("null")
        elif typing.get_origin(member) is typing.Literal:
            names.append("str")
        elif typing.get_origin(member) in (tuple, list):
            names.append("list of str")
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(dict.fromkeys(names))


def _allowed(info, field) -> str:
    from xplan.layout import GATHERED_KINDS, OFFLOAD_KINDS, RECOMPUTE_MODES
    from xplan.layout_tiles import MAX_TILE_TOKENS

    # recompute, offload and keep_gathered have their own parsers (xplan.layout_values).
    if info.name == "recompute":
        return f"{', '.join(f'`{m}`' for m in RECOMPUTE_MODES)}, or a fraction of layers in [0, 1]"
    subsets = {"offload": OFFLOAD_KINDS, "keep_gathered": GATHERED_KINDS}
    if info.name in subsets:
        return f"`none` or a subset of {', '.join(f'`{k}`' for k in subsets[info.name])}"
    if info.name == "tile_tokens":  # its own parser too (xplan.layout_tiles.parse_tile_tokens)
        return f"`null` or `0` (untiled), or tokens from 1 to {MAX_TILE_TOKENS}"
    values = [v for m in _members(field.annotation) if typing.get_origin(m) is typing.Literal
              for v in typing.get_args(m)]
    if values:
        return ", ".join(f"`{v}`" for v in values)
    bounds = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr)}")
    return "integer " + ", ".join(bounds) if bounds else "any"


def _default(info) -> str:
    if info.required:
        return "required"
    if info.name == "tile_tokens":
        return "`none` (untiled)"
    if info.default is None:
        return "derived (see help)"
    if info.default == ():
        return "`none`"
    return f"`{info.default}`"


def _runtime(info) -> str:
    """What `xplan run` executes of this knob, from its `runs` / `runtime_max` / `price_only`."""
    from xplan.layout import DEVICE_TYPES

    if info.price_only:
        return "cost model only (an assumption about another engine; the runtime ignores it)"
    if info.runtime_max is not None:
        return f"{info.runtime_max} only; larger values are priced only"
    if info.runs is None:
        return "every valid value, all device types"
    by_devices: dict[tuple[str, ...], list[str]] = {}
    for value, where in info.runs.items():
        by_devices.setdefault(tuple(where), []).append(f"`{value}`")
    parts = []
    for where, values in by_devices.items():
        if not where:
            target = "priced only"
        elif set(where) == set(DEVICE_TYPES):
            target = "all device types"
        else:
            target = ", ".join(where) + " only"
        parts.append(f"{', '.join(values)}: {target}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def knob_table() -> str:
    """The Markdown table of every layout knob (one row per `xplan.layout.knobs()` entry)."""
    from xplan.layout import knobs

    header = ("plan key", "CLI flag", "`--set` key", "type", "default", "allowed values", "`xplan run` executes",
              "help")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for info in knobs():
        field = _field(info)
        key = "`devices` (top level)" if info.path == ("devices",) else f"`{'.'.join(info.path)}`"
        flag = f"`{info.flag}`" + (f", `{info.short}`" if info.short else "")
        cells = (key, flag, f"`{info.name}`", _type_name(field.annotation), _default(info), _allowed(info, field),
                 _runtime(info), info.help)
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def with_table(text: str, table: str | None = None) -> str:
    """`text` with everything between the knob markers replaced by the rendered table."""
    table = knob_table() if table is None else table
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN} ... {END} are missing or out of order")
    return text[:start + len(BEGIN)] + "\n" + table + text[end:]


def committed_table(text: str) -> str:
    """What a document holds between the knob markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN} ... {END} are missing or out of order")
    return text[start + len(BEGIN):end].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xplan.app.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in the document")
    parser.add_argument("--check", action="store_true", help="exit 1 when the document's table is stale")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"the document (default: {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(knob_table())
        return 0
    try:
        text = args.path.read_text()
        updated = with_table(text)
    except (OSError, ValueError) as exc:
        print(f"error: {args.path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{args.path}: the layout-knob table is stale; regenerate it with `{REGENERATE}`.", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.path.write_text(updated)
        print(f"{args.path}: knob table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
