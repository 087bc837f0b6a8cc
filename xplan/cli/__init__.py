"""The `xplan` command line: one typer app, one module per command.

Exit codes (the contract in DESIGN.md): 0 success, 1 runtime failure, 2 bad input.
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from xplan.processes import exit_worker, under_torchrun

from . import (  # noqa: F401  (importing a module registers its command)
    calibrate_cmd,
    estimate_cmd,
    hw_cmd,
    inspect_cmd,
    models_cmd,
    report_cmd,
    run_cmd,
    search_cmd,
    validate_cmd,
    whatif_cmd,
)
from .app import app, console_err, print_json


def _run(args: list[str]) -> tuple[int, str | None, bool]:
    """Run the app: (exit code, error message or None, whether it was already printed: click
    prints its usage errors itself, with the usage line)."""
    from xplan.errors import InputError

    try:
        result = app(args=args, prog_name="xplan", standalone_mode=False)
        return (result if isinstance(result, int) else 0), None, False
    except InputError as exc:
        return 2, str(exc), False
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), None, False
    except KeyboardInterrupt:
        return 130, "interrupted", False
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: report, don't dump a traceback
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code") and hasattr(exc, "show"):
            exc.show()  # click's usage errors: the message with the usage line
            return exc.exit_code, exc.format_message(), True
        if type(exc).__name__ == "Abort":  # click's wrapper of Ctrl-C
            return 130, "interrupted", False
        if os.environ.get("XPLAN_DEBUG"):
            raise
        return 1, f"{type(exc).__name__}: {exc}", False


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps xplan's errors to exit codes, never a raw traceback. With
    --json a failure is one JSON object on stdout too: {"error": ..., "exit_code": ...}."""
    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    code, message, shown = _run(args)
    if message is not None and code != 0:
        if not shown:
            label = {2: "error", 130: "interrupted"}.get(code, "xplan failed")
            hint = "\n(set XPLAN_DEBUG=1 for the traceback)" if code == 1 else ""
            # Messages quote user input and library text: printed literally, never as markup.
            console_err.print(f"[bold red]{label}:[/] {escape(message)}{hint}", highlight=False)
        if "--json" in args:
            print_json({"error": message, "exit_code": code})
    return code


def entry() -> None:
    code = main()
    if under_torchrun():  # a torchrun worker (`xplan run`): its process groups are gone, finalization can abort
        exit_worker(code)
    sys.exit(code)
