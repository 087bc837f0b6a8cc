"""Find, read, validate and write hardware profiles.

Every failure a user can cause (unknown name, unreadable file, malformed YAML, a value the
schema rejects) raises :class:`xplan.errors.InputError` with a message that names the offending
field and says what to do; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from xplan.errors import InputError

from .schema import Profile

PROFILE_DIR = Path(__file__).resolve().parent
_SCHEMA_HINT = "the schema is in hw_profiles/README.md; `xplan hw` lists the shipped profiles to start from"


def profile_names() -> list[str]:
    """Names of the shipped profiles (the YAML files next to this module)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A shipped profile by name (``h800``) or a profile YAML file by path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike | str) else None
    if not text:
        raise InputError(f"hardware profile must be a name or a path, got {name_or_path!r}; "
                         f"shipped profiles: {', '.join(profile_names())}")
    if not isinstance(name_or_path, os.PathLike) and text in profile_names():
        path = PROFILE_DIR / f"{text}.yaml"
    else:
        path = Path(text).expanduser()
        looks_like_path = isinstance(name_or_path, os.PathLike) or os.sep in text or text.endswith((".yaml", ".yml"))
        if not path.exists():
            if looks_like_path:
                raise InputError(f"hardware profile file {text} does not exist; pass an existing YAML file "
                                 f"or a shipped profile name ({', '.join(profile_names())})")
            close = difflib.get_close_matches(text, profile_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown hardware profile {text!r}{hint}: shipped profiles are "
                             f"{', '.join(profile_names())}; or pass the path of a profile YAML file "
                             "(schema in hw_profiles/README.md)")
        if path.is_dir():
            raise InputError(f"hardware profile path {text} is a directory; pass a profile YAML file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read hardware profile {path}: {exc}; check the path and that it is a "
                         "UTF-8 text YAML file") from None
    return profile_from_yaml(content, origin=str(path))


def profile_from_yaml(text: str, origin: str = "<yaml text>") -> Profile:
    """Parse and validate profile YAML text (``origin`` names it in error messages)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"hardware profile {origin} is not valid YAML{where}: {problem}; fix the syntax "
                         f"({_SCHEMA_HINT})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. an impossible date, too deep nesting
        raise InputError(f"hardware profile {origin} could not be parsed as YAML: {type(exc).__name__}: "
                         f"{exc}; fix the file ({_SCHEMA_HINT})") from None
    return profile_from_dict(data, origin=origin)


def profile_from_dict(data: Any, origin: str = "<dict>") -> Profile:
    """Validate plain data (what a profile YAML file holds) into a :class:`Profile`."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise InputError(f"hardware profile {origin} is {kind}, not a mapping of fields; it must start "
                         f"with fields such as 'schema_version: 1' and 'name: ...' ({_SCHEMA_HINT})")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, origin)) from None
    except (RecursionError, ValueError, TypeError) as exc:  # cyclic YAML aliases and the like
        raise InputError(f"hardware profile {origin} could not be validated: {type(exc).__name__}: {exc}; "
                         f"fix the file ({_SCHEMA_HINT})") from None


def save_profile(profile: Profile, path: str | os.PathLike[str], header: str | None = None) -> Path:
    """Write ``profile`` as YAML (optionally under ``# header`` comment lines); returns the path."""
    out = Path(path)
    text = profile.to_yaml()
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    out.write_text(text, encoding="utf-8")
    return out


# ---------------------------------------------------------------------- error messages
def loc_to_path(loc: tuple[Any, ...]) -> str:
    """('interconnect', 'levels', 0, 'bandwidth_gbps') -> 'interconnect.levels[0].bandwidth_gbps'."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a mapping key
            out += " (key)"
        elif isinstance(part, int):
            out += f"[{part}]"
        elif part == "" or not isinstance(part, str):
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for arg in _types_in(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _field_names(arg, seen)
    return names


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    out: list[Any] = []
    for a in args:
        out.extend(_types_in(a))
    return out


_KNOWN_FIELDS = sorted(_field_names(Profile))

_TYPE_WORDS = {
    "float_type": "a number", "int_type": "a whole number", "string_type": "a string",
    "dict_type": "a mapping", "model_type": "a mapping of fields", "list_type": "a list",
    "bool_type": "true or false", "float_parsing": "a number", "int_parsing": "a whole number",
    "int_from_float": "a whole number",
}


def _one_error(err: dict[str, Any]) -> str:
    path = loc_to_path(tuple(err.get("loc", ()))) or "(top level)"
    typ = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if typ == "missing":
        return f"{path} is missing (required)"
    if typ == "extra_forbidden":
        key = str(err["loc"][-1]) if err.get("loc") else path
        close = difflib.get_close_matches(key, _KNOWN_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path} is not a known field{hint}; remove it"
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values())) if ctx else "?"
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"{path} must be {op} {bound} (got {_short(value)})"
    if typ == "finite_number":
        return f"{path} must be a finite number (got {_short(value)})"
    if typ in _TYPE_WORDS:
        return f"{path} must be {_TYPE_WORDS[typ]} (got {type(value).__name__} {_short(value)})"
    if typ == "literal_error":
        return f"{path} must be {ctx.get('expected', 'one of the allowed values')} (got {_short(value)})"
    if typ == "too_short" and "min_length" in ctx:
        return f"{path} must have at least {ctx['min_length']} item(s)"
    if typ in ("too_short", "too_long"):
        return f"{path}: {err.get('msg', 'wrong length')}"
    if typ == "string_pattern_mismatch":
        return (f"{path} must be a simple name of letters, digits, '.', '_' or '-' "
                f"(got {_short(value)})")
    if typ == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return f"{path}: {msg}" if err.get("loc") else msg
    return f"{path}: {err.get('msg', typ)}"


def format_validation_error(exc: ValidationError, origin: str) -> str:
    """One paragraph naming each offending field (first five) and what to do."""
    errors = exc.errors(include_url=False)
    parts = [_one_error(e) for e in errors[:5]]
    more = f"; and {len(errors) - 5} more problem(s)" if len(errors) > 5 else ""
    return f"hardware profile {origin} is invalid: {'; '.join(parts)}{more}. Fix the file ({_SCHEMA_HINT})."
