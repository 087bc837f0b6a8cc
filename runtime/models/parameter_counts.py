"""Parameter counts of a model: a plain record (no torch), filled by `counting.count_parameters`
from a built model and kept in the planner's cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # total minus the routed experts one token does not visit
    routed_experts: int
    layers_by_kind: dict[str, int]
    vision: int = 0  # vision tower + projector of a vision-language model (inside total and active)
