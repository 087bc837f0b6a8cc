"""Hardware profiles: one YAML per device/cluster kind, the schema, the loader, measurements.

Data only: the formulas that price work on a profile are in ``xplan.cost_models.kernels`` (this
package imports nothing from the cost models, the planner, the runtime or the CLI).

Public API::

    from xplan.hw_profiles import load_profile, profile_names, save_profile
    p = load_profile("h800")                 # or a path to a profile YAML
    p.peak_flops("bf16")                     # FLOP/s
    p.hbm_bandwidth()                        # achievable bytes/s of device memory
    i = p.level_for_group(16)                # 1: a 16-GPU group spans the network level
    p.latency(i)                             # seconds per message on that level

The schema and what one "device" is per profile: hw_profiles/README.md.
"""

from .loader import (
    PROFILE_DIR,
    format_validation_error,
    load_profile,
    profile_from_dict,
    profile_from_yaml,
    profile_names,
    save_profile,
)
from .schema import COLLECTIVES, DTYPES, SCHEMA_VERSION, Level, Profile

__all__ = [
    "COLLECTIVES",
    "DTYPES",
    "PROFILE_DIR",
    "SCHEMA_VERSION",
    "Level",
    "Profile",
    "format_validation_error",
    "load_profile",
    "profile_from_dict",
    "profile_from_yaml",
    "profile_names",
    "save_profile",
]
