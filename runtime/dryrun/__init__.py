"""`xplan run --dry-run`: the plan's training step at full world size and model size on one CPU,
under fake tensors and a fake process group, with rank 0's peak memory tracked.

- `run`: the fake process group and model, one measured step (`train.step.train_step`), `dry_run`;
- `tracker`: the memory tracker, per-moment peaks, categories -> the cost model's components;
- `depth`: layer classes and repeated segments, reduced depth and its linear extrapolation;
- `report`: `DryRunReport`, what was measured.

Private torch APIs are reached through `xplan.runtime.compat`. The comparison with the cost
model's prediction belongs to the application layer (`app/dryrun_compare.py`): the runtime does
not import the planner.
"""

from __future__ import annotations

from .depth import Segment, layer_classes, reduced_layers, segments
from .report import GIB, DryRunReport
from .run import build_fake_model, check_dry_run, dry_run, executed_layout, fake_process_group
from .tracker import COMPONENTS, PhasePeak, components_of

__all__ = ["COMPONENTS", "GIB", "DryRunReport", "PhasePeak", "Segment", "build_fake_model", "check_dry_run",
           "components_of", "dry_run", "executed_layout", "fake_process_group", "layer_classes", "reduced_layers", "segments"]
