"""`xplan hw`: the shipped hardware profiles."""

from __future__ import annotations

from rich.table import Table

from .app import JSON_OPTION, app, console, print_json


@app.command("hw")
def hw(json_out: bool = JSON_OPTION) -> None:
    """List the hardware profiles. A profile YAML path works wherever a name does.

    Example: [bold]xplan hw --json[/]
    """
    from xplan.hw_profiles import load_profile, profile_names

    rows = []
    for name in profile_names():
        profile = load_profile(name)
        rows.append({"name": name, **profile.summary()})
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
