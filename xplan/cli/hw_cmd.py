"""`xplan hw`: the shipped hardware profiles."""

from __future__ import annotations

import hashlib
import json
from importlib import util
from pathlib import Path

from rich.table import Table

from .app import JSON_OPTION, app, console, print_json

SUMMARY_KIND = "hw_summaries"


def _profile_folder() -> Path:
    """The shipped profiles' folder, found without importing the package (pydantic schemas)."""
    spec = util.find_spec("xplan.hw_profiles")
    return Path(next(iter(spec.submodule_search_locations)))


def _valid_rows(rows, names: list[str]) -> bool:
    return (type(rows) is list and [r.get("name") if type(r) is dict else None for r in rows] == names
            and all(type(k) is str and (v is None or type(v) in (bool, int, float, str))
                    for r in rows for k, v in r.items()))


def profile_rows() -> list[dict]:
    """Name and summary of every shipped profile. Validating the YAML files is most of this
    command's time, so the rows are kept in the cache, keyed by every profile file and every
    module of the loader and schema: any edit there recomputes them."""
    from xplan.planner.trace import store

    folder = _profile_folder()
    profiles = sorted(folder.glob("*.yaml"))
    digest = hashlib.sha256()
    for path in profiles + sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    key = digest.hexdigest()[:32]
    names = sorted(p.stem for p in profiles)  # profile_names' order
    cached = store.read_entry(None, SUMMARY_KIND, key)
    if _valid_rows(cached, names):
        return cached
    from xplan.hw_profiles import load_profile, profile_names

    rows = [{"name": name, **load_profile(name).summary()} for name in profile_names()]
    if _valid_rows(rows, names) and json.loads(json.dumps(rows)) == rows:
        store.write_entry(None, SUMMARY_KIND, key, rows)
    return rows


@app.command("hw")
def hw(json_out: bool = JSON_OPTION) -> None:
    """List the hardware profiles. A profile YAML path works wherever a name does.

    Example: [bold]xplan hw --json[/]
    """
    rows = profile_rows()
    if json_out:
        print_json({"profiles": rows})
        return
    table = Table(title="hardware profiles (one device = one rank unless noted)")
    columns = (("name", "name"), ("bf16 TFLOPS", "bf16_tflops"), ("fp8 TFLOPS", "fp8_tflops"),
               ("HBM GiB", "hbm_gib"), ("HBM TB/s", "hbm_tbps"), ("interconnect levels", "levels"))
    for header, _ in columns:
        table.add_column(header, no_wrap=header == "name", justify="left" if header in ("name", "interconnect levels") else "right")
    for r in rows:
        cells = ["-" if r[key] is None else str(r[key]) for _, key in columns]
        if r.get("ranks_per_device", 1) > 1:
            cells[0] += f" ({r['ranks_per_device']} ranks)"
        table.add_row(*cells)
    console.print(table)
