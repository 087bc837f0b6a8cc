"""Compatibility entry point: ``python -m xplan.hw_profiles.measure`` runs ``xplan calibrate``.

The measuring code lives in :mod:`xplan.hw_profiles.calibrate`; this module re-exports the
helpers under their old names and keeps the old command line (``-o``, ``--quick``,
``--world-size``, ``--name``). Regenerate the shipped ``cpu.yaml`` with::

    python -m xplan.hw_profiles.measure -o hw_profiles/cpu.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .calibrate import (
    AttentionResult,
    MatmulResult,
    _sig,
    calibrate,
    fit_gemm_overhead,
    fit_saturation,
    measure_attention,
    measure_copy_bandwidth,
    measure_grouped,
    measure_matmul,
    time_call,
)
from .loader import save_profile

__all__ = ["AttentionResult", "MatmulResult", "_sig", "fit_gemm_overhead", "fit_saturation", "main",
           "measure_attention", "measure_copy_bandwidth", "measure_grouped", "measure_matmul", "time_call"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xplan.hw_profiles.measure",
                                     description="Measure this machine into a hardware profile YAML "
                                                 "(the same as `xplan calibrate`).")
    parser.add_argument("-o", "--output", help="write the profile here (default: print it)")
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (seconds)")
    parser.add_argument("--world-size", "--processes", type=int, default=2, dest="processes",
                        help="ranks the profile is for (processes measured at once; collectives between them)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    parser.add_argument("--name", default=None, help="the profile's name (default: cpu)")
    args = parser.parse_args(argv)
    command = "python -m xplan.hw_profiles.measure " + " ".join(sys.argv[1:] if argv is None else argv)
    result = calibrate(processes=args.processes, threads=args.threads, quick=args.quick, name=args.name,
                       command=command.strip())
    if args.output:
        save_profile(result.profile, args.output, header=result.header)
        print(f"wrote {args.output}")
    else:
        print(result.yaml_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
