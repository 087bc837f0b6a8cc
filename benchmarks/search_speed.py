"""Search speed on the acceptance presets: search_time_s against the 1.0 s target.

Usage: python benchmarks/search_speed.py [--repeat 3]
Traces are taken (and cached on disk) before timing; the timed part is enumerating and pricing.
Also checks that the pruned search returns the exhaustive search's best plan.
"""

from __future__ import annotations

import argparse
import statistics

from xplan.planner.pricing import Workload, get_trace
from xplan.planner.search import search

CASES = [("deepseek-v3", 2048, 15360), ("kimi-k2", 1024, 4096), ("qwen3-235b-a22b", 256, 2048)]
TARGET_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive comparison")
    args = parser.parse_args()
    print(f"{'model':18} {'devices':>7} {'median s':>9} {'target':>7} {'ratio':>6} {'candidates':>10} "
          f"{'tok/s/dev':>10} {'same best as exhaustive':>24}")
    for model, devices, batch in CASES:
        workload = Workload(model, "h800", 4096, batch)
        for loss in ("full", "chunked"):
            get_trace(model, 4096, loss)
        runs = [search(workload, devices) for _ in range(args.repeat)]
        median = statistics.median(r.search_time_s for r in runs)
        best = runs[0].plans[0]
        same = "-"
        if not args.no_exhaustive:
            full = search(workload, devices, exhaustive=True)
            same = str(full.plans[0].layout == best.layout)
        print(f"{model:18} {devices:7d} {median:9.3f} {TARGET_S:7.1f} {median / TARGET_S:6.2f} "
              f"{runs[0].candidates_evaluated:10d} {best.tokens_per_s_per_device:10.0f} {same:>24}")


if __name__ == "__main__":
    main()
