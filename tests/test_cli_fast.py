"""A CLI that answers in a second (issue #14): --version, and what the listing commands import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from xplan import __version__
from xplan.cli import main


def test_version_prints_the_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"xplan {__version__}\n"


def test_listing_commands_import_no_torch():
    code = textwrap.dedent("""
        import sys
        from xplan.cli import main
        for args in (["--version"], ["hw", "--json"], ["hw"]):
            assert main(args) == 0, args
        heavy = [m for m in ("torch", "transformers", "networkx") if m in sys.modules]
        assert not heavy, heavy
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
