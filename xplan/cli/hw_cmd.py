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
    table = Table(title="hardware profiles")
    if rows:
        for col in rows[0]:
            table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)
