"""The plan file: YAML, versioned (`xplan_plan: 1`), human-editable, validated on load.

Written by `xplan search`, read by `xplan run`, `whatif` and `report`. Every field is checked with
a message that names it; unknown keys are errors (a typo must not silently change a run).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from xplan.errors import InputError, read_yaml
from xplan.layout import Layout, layout_from_dict

PLAN_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerSettings(_Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleSettings(_Strict):
    kind: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class DataSettings(_Strict):
    kind: Literal["synthetic", "jsonl", "text", "image_jsonl"] = "synthetic"
    path: str | None = None  # jsonl of token-id lists, a text file, or a jsonl of image + text samples
    tokenizer: str | None = None  # local tokenizer directory for kind=text
    seed: int = 0


class TrainingSettings(_Strict):
    seq_len: int = Field(..., ge=1)
    global_batch: int = Field(..., ge=1)  # sequences per optimizer step
    image_tokens: int = Field(0, ge=0)  # image tokens per sample (vision-language models; images first)
    # Share of samples that carry images (the rest are text only); the vision tower's compute is
    # priced at this share, its memory at a micro-batch of image samples.
    image_fraction: float = Field(1.0, gt=0, le=1)
    steps: int = Field(10, ge=1)
    seed: int = 0
    grad_clip: float = Field(1.0, ge=0)
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"  # scaling of fp8 GEMMs (precision fp8)
    optimizer: OptimizerSettings = OptimizerSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    data: DataSettings = DataSettings()


class PlanFile(_Strict):
    xplan_plan: Literal[1]
    model: str = Field(..., min_length=1)  # preset name or config directory
    hardware: str = Field(..., min_length=1)  # profile name or YAML path
    devices: int = Field(..., ge=1)  # the hardware profile's devices (a3: 910C packages)
    ranks_per_device: int = Field(1, ge=1)  # processes per device: the profile's (a3: 2, one per die)
    devices_per_node: int | None = Field(None, ge=1)
    headroom_gib: float = Field(0.0, ge=0)  # device memory search kept free (GiB per device)
    layout: dict[str, Any] = {}  # every knob of xplan.layout.Layout (sizes in ranks) but devices
    training: TrainingSettings
    predictions: dict[str, Any] = {}  # what the cost models said; compared with measurements
    notes: str = ""
    # Provenance, written by `xplan search` (informational: nothing reads them to run or price).
    xplan_version: str | None = None
    created: str | None = None  # ISO 8601, UTC
    command: str | None = None  # the command line that wrote the plan
    profile_sha256: str | None = None  # SHA-256 of the hardware profile file priced against


class Plan:
    """A validated plan: the file's contents plus the Layout object every stage uses."""

    def __init__(self, data: PlanFile):
        self.data = data
        for key in ("devices", "ranks_per_device"):
            if key in data.layout:
                raise InputError(f"layout.{key}: the plan states it at the top level (`{key}`).")
        self.layout: Layout = layout_from_dict({"devices": data.devices, "ranks_per_device": data.ranks_per_device,
                                                **data.layout})

    @property
    def model(self) -> str:
        return self.data.model

    @property
    def hardware(self) -> str:
        return self.data.hardware

    @property
    def training(self) -> TrainingSettings:
        return self.data.training

    @property
    def grad_accum(self) -> int:
        return self.layout.grad_accum(self.training.global_batch)

    def to_dict(self) -> dict[str, Any]:
        return self.data.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise InputError(f"{source}: a plan file must be a YAML mapping with `xplan_plan: {PLAN_VERSION}` at the top.")
    if data.get("xplan_plan") != PLAN_VERSION:
        raise InputError(f"{source}: `xplan_plan` must be {PLAN_VERSION} (got {data.get('xplan_plan')!r}); "
                         "regenerate the plan with `xplan search`.")
    try:
        return Plan(PlanFile.model_validate(data))
    except ValidationError as exc:
        problems = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise InputError(f"{source} is not a valid plan: {problems}.") from None
    except InputError as exc:
        raise InputError(f"{source} is not a valid plan: {exc}") from None


def _is_path(reference: str) -> bool:
    """A model or hardware reference that names a file or directory rather than a preset."""
    return "/" in reference or reference.endswith((".yaml", ".yml")) or reference.startswith(".")


def _relative(path: Path, base: Path) -> str:
    rel = os.path.relpath(path, base)
    return rel if rel.startswith(".") else f"./{rel}"  # "./name" stays a path, not a preset name


def _with_references(plan: Plan, convert) -> Plan:
    changes = {key: convert(getattr(plan.data, key)) for key in ("model", "hardware")
               if _is_path(getattr(plan.data, key))}
    return Plan(plan.data.model_copy(update=changes)) if changes else plan


def load_plan(path: str | Path) -> Plan:
    """A plan file; model and hardware paths in it are relative to the plan file's folder (or
    absolute), so the plan runs from any working directory."""
    path = Path(path)
    plan = plan_from_dict(read_yaml(path, "plan file"), source=str(path))
    base = path.resolve().parent
    return _with_references(plan, lambda ref: ref if Path(ref).is_absolute() else os.path.normpath(base / ref))


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write atomically; model and hardware paths are stored relative to the plan's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    plan = _with_references(plan, lambda ref: _relative(Path(ref).resolve(), base))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(plan.to_yaml())
    tmp.replace(path)
    return path


def make_plan(model: str, hardware: str, layout: Layout, training: dict[str, Any],
              predictions: dict[str, Any] | None = None, devices_per_node: int | None = None,
              notes: str = "", **metadata: Any) -> Plan:
    """Assemble a plan from a Layout (used by search and by tests that write plans by hand).
    `metadata`: the optional top-level fields (`headroom_gib` and the provenance fields; see
    `provenance`)."""
    layout_fields = {k: v for k, v in layout.settings().items() if k not in ("devices", "ranks_per_device")}
    return plan_from_dict({
        "xplan_plan": PLAN_VERSION, "model": model, "hardware": hardware, "devices": layout.devices,
        "ranks_per_device": layout.ranks_per_device, "devices_per_node": devices_per_node, "layout": layout_fields,
        "training": training, "predictions": predictions or {}, "notes": notes, **metadata,
    })


def profile_sha256(hardware: str) -> str | None:
    """SHA-256 of the profile file `hardware` names (a shipped name or a YAML path); None when
    there is no such file (the loader reports that itself)."""
    from xplan.hw_profiles.loader import PROFILE_DIR, profile_names

    path = PROFILE_DIR / f"{hardware}.yaml" if hardware in profile_names() else Path(hardware).expanduser()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def provenance(hardware: str, command: list[str] | None = None) -> dict[str, Any]:
    """The provenance fields of a plan written now: xplan version, UTC time, the command line
    (`command`, else this process's arguments), and the profile's checksum (so a later reader can
    tell whether the profile changed since)."""
    from xplan import __version__

    command = ["xplan", *sys.argv[1:]] if command is None else command
    return {"xplan_version": __version__,
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "command": shlex.join(command), "profile_sha256": profile_sha256(hardware)}
