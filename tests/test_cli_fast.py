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


def test_hw_rows_come_from_the_cache_and_equal_the_profiles(tmp_path, monkeypatch):
    from xplan.cli.hw_cmd import SUMMARY_KIND, profile_rows
    from xplan.hw_profiles import load_profile, profile_names

    monkeypatch.setenv("XPLAN_CACHE_DIR", str(tmp_path))
    expected = [{"name": n, **load_profile(n).summary()} for n in profile_names()]
    assert profile_rows() == expected  # computed and stored
    (entry,) = (tmp_path / SUMMARY_KIND).glob("*.json")
    assert profile_rows() == expected  # read back
    entry.write_bytes(entry.read_bytes()[:-10])
    assert profile_rows() == expected  # damaged: recomputed
