"""Longest sequence that fits, per Ulysses degree: `xplan.planner.search` bisected over seq_len.

For each sp, the search runs with sp pinned (everything else searched: sharding, EP, micro-batch,
recompute, offload, kept blocks, loss kernel) and one sequence per data-parallel rank per step
(global batch = devices / sp); seq_len is bisected in steps of `--step` tokens between what fits
and what does not. Prints a table (issue #16: at least 64k at sp 1, doubling with each doubling of
sp, 512k at sp 8) with the winning layout and its levers.

    python benchmarks/max_seq_len.py [--model qwen3-235b-a22b] [--hardware h800] [--devices 256]
                                     [--sp 1,2,4,8] [--step 4096] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def fitting_plan(model: str, hardware: str, devices: int, sp: int, seq_len: int):
    """The search's best runnable plan at `seq_len` (None when nothing fits); a line on stderr
    each (a bisection runs a dozen searches per sp, each tracing its sequence length first)."""
    from xplan.errors import InputError
    from xplan.planner.pricing import Workload
    from xplan.planner.search import search

    began = time.perf_counter()
    try:
        plan = search(Workload(model, hardware, seq_len, devices // sp), devices, {"sp": sp}, top=1).best_runnable
    except InputError:
        plan = None
    print(f"  sp {sp}: seq_len {seq_len:,} {'fits' if plan is not None else 'does not fit'} "
          f"({time.perf_counter() - began:.1f} s)", file=sys.stderr, flush=True)
    return plan


def longest(model: str, hardware: str, devices: int, sp: int, step: int, start: int, limit: int):
    """(longest fitting seq_len, its plan, searches run): doubling from `start`, then bisection."""
    unit = step * sp // __import__("math").gcd(step, sp)  # seq_len must stay a multiple of sp
    low, plan, runs = 0, None, 0
    high = max(unit, start // unit * unit)
    while high <= limit:  # double until it no longer fits
        runs += 1
        found = fitting_plan(model, hardware, devices, sp, high)
        if found is None:
            break
        low, plan, high = high, found, high * 2
    else:
        return low, plan, runs
    while high - low > unit:
        mid = (low + high) // 2 // unit * unit
        if mid in (low, high):
            break
        runs += 1
        found = fitting_plan(model, hardware, devices, sp, mid)
        if found is None:
            high = mid
        else:
            low, plan = mid, found
    return low, plan, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-235b-a22b")
    parser.add_argument("--hardware", default="h800")
    parser.add_argument("--devices", type=int, default=256)
    parser.add_argument("--sp", default="1,2,4,8")
    parser.add_argument("--step", type=int, default=4096, help="seq_len granularity in tokens")
    parser.add_argument("--start", type=int, default=32768, help="first seq_len tried")
    parser.add_argument("--limit", type=int, default=4 * 2**20, help="longest seq_len tried")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for sp in (int(s) for s in args.sp.split(",")):
        start = time.perf_counter()
        seq, plan, runs = longest(args.model, args.hardware, args.devices, sp, args.step, args.start * sp, args.limit)
        row = {"sp": sp, "max_seq_len": seq, "searches": runs, "elapsed_s": time.perf_counter() - start}
        if plan is not None:
            lay = plan.layout
            row.update(tokens_per_s_per_device=plan.tokens_per_s_per_device, memory_gib=plan.memory.total / 2**30,
                       host_gib=plan.memory.offloaded_to_host / 2**30,
                       layout=f"fsdp{lay.fsdp} ep{lay.ep} mb{lay.micro_batch} recompute={lay.recompute} "
                              f"offload={'+'.join(lay.offload) or 'none'} tile_tokens={lay.tile_tokens or 'none'} "
                              f"keep_gathered={'+'.join(lay.keep_gathered) or 'none'}")
        rows.append(row)
    if args.json:
        print(json.dumps({"model": args.model, "hardware": args.hardware, "devices": args.devices, "rows": rows},
                         indent=2))
        return
    print(f"longest fitting sequence: {args.model} on {args.devices} x {args.hardware} "
          f"(one sequence per data-parallel rank, granularity {args.step})")
    print(f"{'sp':>3} {'max seq_len':>12} {'tok/s/dev':>10} {'GiB':>6} {'host GiB':>9}  layout")
    for row in rows:
        print(f"{row['sp']:>3} {row['max_seq_len']:>12,} {row.get('tokens_per_s_per_device', 0):>10,.0f} "
              f"{row.get('memory_gib', 0):>6.1f} {row.get('host_gib', 0):>9.1f}  {row.get('layout', '-')}")


if __name__ == "__main__":
    main()
