"""The report's numbers: one priced layout broken down, its alternatives, sweeps and a 3D comparison.

`build_report` returns plain data (the `xplan report --json` object, also embedded in the HTML);
`report_text` / `report_html` render it. Every price comes from `xplan.planner.pricing.price` or
`xplan.planner.search.search`, so the chosen layout's numbers are `xplan estimate --json`'s.
Sweeps re-price the chosen layout at a handful of points (traces are cached on disk), so a report
for a 235B model on 256 devices takes seconds.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from xplan.errors import InputError

from .report_explain import (
    COMM_KINDS,
    MEMORY_COMPONENTS,
    TIME_KIND,
    TIME_WORDS,
    flat_layout,
    memory_margin,
    separation,
)

REPORT_FORMAT = 1
GIB = 2**30
IMBALANCES = (1.0, 1.1, 1.25, 1.5, 2.0)
SCALES = (0.25, 0.5, 1, 2, 4)  # device counts
SEQ_SCALES = (0.5, 1, 2, 4)  # sequence lengths: each new one is a trace (seconds, then cached on disk)


def _point(est: dict[str, Any]) -> dict[str, Any]:
    """A compact view of an estimate (for scatter plots and sweeps)."""
    return {"tokens_per_s_per_device": est["tokens_per_s_per_device"], "peak_gib": est["memory_gib"]["allocated"],
            "step_time_s": est["step_time_s"], "mfu": est["mfu"], "fits": est["fits"],
            "layout": flat_layout(est["layout"])}


def _fits(est: dict[str, Any], headroom_gib: float) -> bool:
    mem = est["memory_gib"]
    return mem["allocated"] <= mem["capacity"] - headroom_gib and mem["offloaded_to_host"] <= mem["host_capacity"]


def memory_section(est: dict[str, Any], headroom_gib: float) -> dict[str, Any]:
    mem = est["memory_gib"]
    return {"device_gib": {k: mem[k] for k in MEMORY_COMPONENTS}, "allocated_gib": mem["allocated"],
            "total_gib": mem["total"],
            "capacity_gib": mem["capacity"], "headroom_gib": headroom_gib,
            "usable_gib": mem["capacity"] - headroom_gib, "free_gib": mem["capacity"] - mem["allocated"],
            "host": {"offloaded_gib": mem["offloaded_to_host"], "capacity_gib": mem["host_capacity"]},
            "fits": _fits(est, headroom_gib)}


def time_section(est: dict[str, Any]) -> dict[str, Any]:
    parts = {k: v for k, v in est["time_s"].items() if v}
    by_kind: dict[str, float] = {}
    for key, value in parts.items():
        kind = TIME_KIND.get(key, "compute")
        by_kind[kind] = by_kind.get(kind, 0.0) + value
    exposed = {COMM_KINDS[k]: est["time_s"].get(k, 0.0) for k in COMM_KINDS}
    return {"step_time_s": est["step_time_s"], "grad_accum": est["grad_accum"], "components_s": parts,
            "by_kind_s": by_kind, "exposed_communication_s": exposed,
            "words": {k: TIME_WORDS.get(k, k) for k in parts}}


def _lighter(layout) -> list[tuple[str, Any]]:
    """The next cheaper-in-time settings memory may have ruled out: a lighter recompute, no offload."""
    from xplan.planner.search import RECOMPUTE_ORDER

    out = []
    order = [r for r in RECOMPUTE_ORDER if r != "selective"]
    if layout.recompute in order and order.index(layout.recompute) > 0:
        out.append(("recompute", order[order.index(layout.recompute) - 1]))
    if layout.offload:
        out.append(("offload", ()))
    if layout.micro_batch > 1:
        out.append(("micro_batch", layout.micro_batch * 2))
    return out


def binding_section(workload, layout, est: dict[str, Any], headroom_gib: float) -> dict[str, Any]:
    """What limits the layout, in words, and what memory keeps it from (levers priced)."""
    from xplan.planner.pricing import price

    times = time_section(est)
    step = est["step_time_s"]
    top = max(times["components_s"], key=times["components_s"].get) if times["components_s"] else "compute"
    comm = times["by_kind_s"].get("communication", 0.0)
    lines = [f"binding: {est['binding']}"]
    if est["fits"]:
        lines.append(f"{TIME_WORDS.get(top, top)} is the largest part of the step ({times['components_s'][top]:.2f} of "
                     f"{step:.2f} s, {times['components_s'][top] / step:.0%}); exposed communication is "
                     f"{comm:.2f} s ({comm / step:.0%}).")
    lines.append(f"Memory: {memory_margin(est, headroom_gib)}.")
    levers = []
    for name, value in _lighter(layout):
        try:
            other = price(workload, layout.with_changes(**{name: value})).to_dict()
        except InputError:
            continue
        fits = _fits(other, headroom_gib)
        levers.append({"change": f"{name} {value if name != 'offload' else 'none'}", "fits": fits,
                       "peak_gib": other["memory_gib"]["allocated"], "offloaded_gib": other["memory_gib"]["offloaded_to_host"],
                       "tokens_per_s_per_device": other["tokens_per_s_per_device"]})
        gain = other["tokens_per_s_per_device"] / est["tokens_per_s_per_device"] - 1.0
        if not fits and gain > 0:
            lines.append(f"Memory binds {name}: {levers[-1]['change']} would run {gain:+.1%} tokens/s/device but peak at "
                         f"{other['memory_gib']['allocated']:.1f} GiB (usable {est['memory_gib']['capacity'] - headroom_gib:.1f}).")
    return {"binding": est["binding"], "explanation": lines, "levers": levers}


def _search_pins(layout) -> dict[str, Any]:
    """Decisions the search does not explore, held at the chosen layout's values."""
    return {"precision": layout.precision, "attention": layout.kernels.attention, "moe_gemm": layout.kernels.moe_gemm,
            "elementwise": layout.kernels.elementwise, "tp_comm": layout.tp_comm}


def _sweep(workload, layout, points: list[tuple[Any, Any, Any]], headroom_gib: float) -> list[dict[str, Any]]:
    """Price (x, workload, layout) points; an invalid point keeps its reason."""
    from xplan.planner.pricing import price

    out = []
    for x, w, lay in points:
        try:
            est = price(w, lay).to_dict()
        except InputError as exc:
            out.append({"x": x, "error": str(exc)})
            continue
        out.append({"x": x, **_point(est), "fits": _fits(est, headroom_gib)})
    return out


def _resized(layout, devices: int):
    """The layout on `devices` devices as `whatif --set devices=N` re-derives it."""
    changes: dict[str, Any] = {"devices": devices}
    if layout.dp_mode != "hsdp":
        changes.update(fsdp=None, dp_mode=None if layout.dp_mode == "fsdp" else layout.dp_mode)
    return layout.with_changes(**changes)


def sweeps_section(workload, layout, headroom_gib: float) -> dict[str, Any]:
    from xplan.planner.pricing import MAX_SEQ_LEN, load_model_config

    config = load_model_config(workload.model)
    seqs = sorted({int(workload.seq_len * s) for s in SEQ_SCALES if workload.seq_len * s >= 16
                   and int(workload.seq_len * s) % layout.sp == 0
                   and workload.seq_len * s <= min(MAX_SEQ_LEN, config.max_position_embeddings)} | {workload.seq_len})
    seq_points = [(s, replace(workload, seq_len=s), layout) for s in seqs]
    dev_points = []
    for scale in SCALES:
        devices, batch = layout.devices * scale, workload.global_batch * scale
        if devices >= 1 and devices == int(devices) and batch == int(batch):
            try:
                dev_points.append((int(devices), replace(workload, global_batch=int(batch)), _resized(layout, int(devices))))
            except InputError:
                continue
    return {
        "seq_len": {"note": "the same layout and global batch (sequences) at each sequence length, as "
                            "`xplan whatif --set seq_len=N`", "points": _sweep(workload, layout, seq_points, headroom_gib)},
        "devices": {"note": "the same layout on more or fewer devices, the global batch scaled with them (sequences "
                            "per device constant); FSDP groups re-derived as `xplan whatif --set devices=N`",
                    "points": _sweep(workload, layout, dev_points, headroom_gib)},
    }


def imbalance_section(workload, layout, headroom_gib: float, plans: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The layout priced at rising routing imbalance, and beside it the fastest listed layout with the
    other kind of expert placement (ep > 1 when the chosen one has ep 1, and the reverse)."""
    from xplan.layout import layout_from_dict
    from xplan.planner.pricing import load_model_config

    if not load_model_config(workload.model).num_experts:
        return None
    points = [(x, replace(workload, imbalance=x), layout) for x in IMBALANCES]
    note = "busiest expert-parallel rank's routed load over the mean (`--imbalance`); the layout held fixed"
    if layout.ep == 1:
        note += "; with ep 1 every rank holds every expert, so routing imbalance costs it nothing"
    other = next((p for p in plans if (p["layout"]["ep"] > 1) == (layout.ep == 1)), None)
    section = {"note": note, "points": _sweep(workload, layout, points, headroom_gib),
               "compare_label": None, "compare_points": None}
    if other is not None:
        alt = layout_from_dict(other["layout"])
        section["compare_label"] = f"fastest listed layout with ep {alt.ep}"
        section["compare_points"] = _sweep(workload, alt, [(x, w, alt) for x, w, _ in points], headroom_gib)
    return section


def comparison_3d(workload, layout, chosen: dict[str, Any], headroom_gib: float) -> dict[str, Any]:
    """The best Megatron-style 3D layout (TP × PP × data parallel with the distributed optimizer,
    `search --allow-3d` pricing; price only) beside the chosen layout."""
    from xplan.planner.search import search

    start = time.perf_counter()
    pins = {"sp": 1, "dp_mode": "zero1", "loss": layout.kernels.loss, **_search_pins(layout)}
    note = ("the fastest TP × PP × DP layout with Megatron's distributed optimizer (ZeRO-1), Ulysses off and no "
            "offload (offload only if nothing fits without), as `xplan search --allow-3d` prices it; priced only: "
            "`xplan run` does not execute tensor or pipeline parallelism")
    best, evaluated = None, 0
    # Megatron-style first (no offload; fast), then with the offload choices if nothing fits without.
    for extra in ({"offload": ()}, {}):
        try:
            result = search(workload, layout.devices, {**pins, **extra}, allow_3d=True, top=10**6,
                            headroom_bytes=headroom_gib * GIB)
        except InputError as exc:
            if extra:
                continue
            return {"note": note, "chosen": chosen, "best_3d": None, "reason": str(exc),
                    "search_time_s": time.perf_counter() - start, "candidates_evaluated": evaluated}
        evaluated += result.candidates_evaluated
        best = next((e for e in result.plans if e.layout.tp * e.layout.pp > 1), None)
        if best is not None:
            break
    return {"note": note, "chosen": chosen, "best_3d": best.to_dict() if best else None,
            "reason": None if best else "no tensor- or pipeline-parallel layout fits",
            "separation": separation(chosen, best.to_dict()) if best else None,
            "search_time_s": time.perf_counter() - start, "candidates_evaluated": evaluated}


def build_report(workload, layout, *, headroom_gib: float = 0.0, search_result=None, plan=None,
                 plan_file: str | None = None, before: dict[str, Any] | None = None, title: str | None = None,
                 alternatives: int = 5, sweeps: bool = True) -> dict[str, Any]:
    """Everything the report shows, as plain data.

    `search_result`: a `SearchResult` of this workload to take alternatives and the Pareto front from
    (else a search is run, the chosen layout's precision and kernels pinned); `plan`: the loaded plan
    (its provenance is shown); `before`: an estimate dict shown as the first alternative (whatif's
    plan as written)."""
    from xplan.planner.pricing import load_hw, price, run_refusals
    from xplan.planner.search import search

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    load_hw(workload.hardware)  # a bad profile name is an input error before anything is priced
    chosen = price(workload, layout).to_dict()
    lap("price")
    if search_result is None:
        search_result = search(workload, layout.devices, _search_pins(layout), top=30,
                               headroom_bytes=headroom_gib * GIB)
    lap("search")
    plans = [e.to_dict() for e in search_result.plans]
    alts = []
    if before is not None:
        alts.append({"label": "plan as written", "estimate": before, **separation(chosen, before)})
    for i, est in enumerate(plans, 1):
        if len(alts) >= alternatives:
            break
        if est["layout"] != chosen["layout"]:
            alts.append({"label": f"#{i}", "estimate": est, **separation(chosen, est)})
    chosen_layout = flat_layout(chosen["layout"])
    pareto = [{**_point(e.to_dict()), "chosen": flat_layout(e.layout.to_dict()) == chosen_layout}
              for e in search_result.pareto]
    report: dict[str, Any] = {
        "report": REPORT_FORMAT, "title": title or f"{workload.model} on {layout.devices} × {workload.hardware}",
        "model": workload.model, "hardware": workload.hardware, "devices": layout.devices,
        "seq_len": workload.seq_len, "global_batch": workload.global_batch, "imbalance": chosen["imbalance"],
        "headroom_gib": headroom_gib, "plan_file": plan_file, "provenance": _provenance(plan, workload.hardware),
        "estimate": chosen, "runtime_refusals": run_refusals(workload, layout),
        "memory": memory_section(chosen, headroom_gib), "time": time_section(chosen),
        "binding": binding_section(workload, layout, chosen, headroom_gib), "alternatives": alts,
        "search": {"candidates_evaluated": search_result.candidates_evaluated,
                   "search_time_s": search_result.search_time_s, "pareto": pareto,
                   "plans": [_point(e) for e in plans]},
    }
    lap("explain")
    if sweeps:
        report["sweeps"] = sweeps_section(workload, layout, headroom_gib)
        lap("sweeps")
        report["imbalance_sensitivity"] = imbalance_section(workload, layout, headroom_gib, plans)
        lap("imbalance")
        report["comparison_3d"] = comparison_3d(workload, layout, chosen, headroom_gib)
        lap("comparison_3d")
    report["timings_s"] = timings
    return report


def _provenance(plan, hardware: str) -> dict[str, Any] | None:
    """The plan's recorded provenance and whether the profile changed since it was written."""
    from xplan.plan import profile_sha256

    now = profile_sha256(hardware)
    if plan is None:
        return {"profile_sha256_now": now}
    data = plan.data
    recorded = data.profile_sha256
    return {"xplan_version": data.xplan_version, "created": data.created, "command": data.command,
            "profile_sha256": recorded, "profile_sha256_now": now,
            "profile_changed": None if recorded is None or now is None else recorded != now}
