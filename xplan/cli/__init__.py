"""The `xplan` command line: one typer app, one module per command.

Exit codes (the contract in DESIGN.md): 0 success, 1 runtime failure, 2 bad input.
"""

from __future__ import annotations

import os
import sys

from . import (  # noqa: F401  (importing a module registers its command)
    calibrate_cmd,
    estimate_cmd,
    hw_cmd,
    inspect_cmd,
    models_cmd,
    run_cmd,
    search_cmd,
    validate_cmd,
    whatif_cmd,
)
from .app import app, console_err


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps xplan's errors to exit codes, never a raw traceback."""
    from xplan.errors import InputError

    try:
        app(args=argv, prog_name="xplan")  # click reports usage errors itself and exits 2
    except InputError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        console_err.print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: report, don't dump a traceback
        if os.environ.get("XPLAN_DEBUG"):
            raise
        console_err.print(f"[bold red]xplan failed:[/] {type(exc).__name__}: {exc}\n"
                          "(set XPLAN_DEBUG=1 for the traceback)", highlight=False)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
