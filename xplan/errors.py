"""Errors every stage shares. The CLI turns `InputError` into exit code 2 with its message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Plan files, profiles and validation sets are a few KiB; anything this large is the wrong file.
MAX_INPUT_BYTES = 16 * 2**20


class InputError(ValueError):
    """Bad user input: unknown model or profile, malformed file, impossible layout.

    The message must say what is wrong and what to do about it, in one paragraph.
    """


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML file at `path`; an unreadable or malformed file is an InputError naming
    it as `what` (e.g. "plan file")."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InputError(f"{what} {path} is larger than {MAX_INPUT_BYTES // 2**20} MiB; is it the right file?")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}); is it the right file?") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{what} {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to be a {what}.") from None
