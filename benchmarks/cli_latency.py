"""CLI latency: wall time of each command as a fresh subprocess, warm cache, against the issue #14 targets.

    python benchmarks/cli_latency.py [--repeat 5] [--json]

Each command runs `--repeat` times (after one untimed warm-up run that fills the trace, config
and parameter-count caches); the table shows the median, the ratio to the median of
`python -c "import yaml"` (the floor any Python CLI pays), the target and whether it is met. The
search rows also show the search's own `search_time_s` (enumerating and pricing only).
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = [sys.executable, "-c", "import yaml"]
# (label, arguments to `xplan`, target wall seconds, target search_time_s or None)
CASES = [
    ("xplan --version", ["--version"], 0.5, None),
    ("xplan hw", ["hw"], 0.5, None),
    ("xplan models", ["models"], 0.5, None),
    ("xplan search qwen3-235b-a22b h800 -n 256", ["search", "qwen3-235b-a22b", "h800", "--devices", "256", "--json"],
     1.5, None),
    ("xplan search deepseek-v3 h800 -n 2048", ["search", "deepseek-v3", "h800", "--devices", "2048", "--json"],
     None, 0.5),
]


class CommandFailed(Exception):
    pass


def xplan_command(args: list[str]) -> list[str]:
    """The installed console script (as a shell starts it), else the same entry point via -c."""
    script = Path(sys.executable).with_name("xplan")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "from xplan.cli import entry; entry()", *args]


def timed_run(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise CommandFailed(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return elapsed, done.stdout


def measure(command: list[str], repeat: int) -> tuple[float, float | None]:
    """(median wall seconds, median search_time_s when the command prints search JSON)."""
    timed_run(command)  # warm-up: caches filled, files in the page cache
    walls, searches = [], []
    for _ in range(repeat):
        wall, out = timed_run(command)
        walls.append(wall)
        if '"search_time_s"' in out:
            searches.append(json.loads(out)["search_time_s"])
    return statistics.median(walls), (statistics.median(searches) if searches else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()

    baseline, _ = measure(BASELINE, args.repeat)
    rows, ok = [], True
    for label, xplan_args, wall_target, search_target in CASES:
        try:
            wall, search_s = measure(xplan_command(xplan_args), args.repeat)
        except CommandFailed as exc:
            ok = False
            rows.append({"command": label, "median_s": None, "ratio": None, "target_s": wall_target,
                         "search_time_s": None, "search_target_s": search_target, "met": False,
                         "error": str(exc)})
            continue
        met = (wall_target is None or wall <= wall_target) and (search_target is None or
                                                                (search_s is not None and search_s <= search_target))
        ok &= met
        rows.append({"command": label, "median_s": wall, "ratio": wall / baseline, "target_s": wall_target,
                     "search_time_s": search_s, "search_target_s": search_target, "met": met})
    if args.json:
        print(json.dumps({"baseline": {"command": "python -c 'import yaml'", "median_s": baseline},
                          "repeat": args.repeat, "rows": rows}, indent=2))
        return 0 if ok else 1
    print(f"baseline python -c 'import yaml': {baseline:.3f} s (median of {args.repeat})")
    print(f"{'command':44} {'median s':>9} {'ratio':>6} {'target':>7} {'search s':>9} {'target':>7}  met")
    for r in rows:
        if r["median_s"] is None:
            print(f"{r['command']:44} failed: {r['error']}")
            continue
        wall_t = f"{r['target_s']:.1f}" if r["target_s"] is not None else "-"
        search_s = f"{r['search_time_s']:.3f}" if r["search_time_s"] is not None else "-"
        search_t = f"{r['search_target_s']:.1f}" if r["search_target_s"] is not None else "-"
        print(f"{r['command']:44} {r['median_s']:9.3f} {r['ratio']:6.1f} {wall_t:>7} {search_s:>9} {search_t:>7}  "
              f"{'yes' if r['met'] else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
