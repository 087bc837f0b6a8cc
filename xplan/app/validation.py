"""`xplan validate`: the estimator against the published-results set.

`cost_models/published_results.yaml` is a verbatim copy of the shared published-results
set; `validation_cases.yaml` maps every row of it either onto the estimator (model, hardware
profile, layout, sequence length, global batch, metric and FLOP convention) or to the reason it
cannot be expressed. `run_validation()` traces each (model, seq_len, loss kernel) once, prices
every case with `estimate`, and reports predicted vs published with

    error = predicted / published - 1

per row, and the median and maximum absolute error over the throughput-type rows
(tokens/s/device, TFLOPS/device, MFU) and over the memory rows separately.

Predicted TFLOPS are the estimator's tokens/s/device times the FLOPs per token of the source's
own convention (`flops_per_token`), so a TFLOPS error equals the tokens/s error; nothing is
fitted per row.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xplan import cost_models
from xplan.cost_models.compute import traced_loss
from xplan.errors import InputError, read_yaml

# The published data and the case translations stay with the cost models they check.
HERE = Path(cost_models.__file__).resolve().parent
CASES_PATH = HERE / "validation_cases.yaml"
PUBLISHED_PATH = HERE / "published_results.yaml"

THROUGHPUT_METRICS = ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu")
MEMORY_METRICS = ("memory_gib",)
METRICS = THROUGHPUT_METRICS + MEMORY_METRICS
FLOP_CONVENTIONS = ("megatron", "internevo")

#: progress(done, total, label): called before each trace group ("label") and once at the end.
Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- FLOP conventions
def flops_per_token(spec: dict[str, Any], seq_len: int) -> float:
    """Model FLOPs per token (forward + backward) under a published source's own convention.

    - ``megatron``: Megatron-LM ``num_floating_point_operations`` (v0.8/0.9) divided by the tokens
      of the batch: ``12 L h^2 [(1 + g/a + s/h)(a d/h) + (ffn/h) k m + V/(2 L h)]``, with g kv
      heads, a heads, d head dim, k router top-k (1 dense), m = 3/2 for gated MLPs. Dense GPT
      (g = a, d = h/a, ffn = 4h, m = 1): ``72 L h^2 (1 + s/(6h) + V/(12 h L))``.
    - ``internevo``: InternEvo ``get_megatron_flops`` per token:
      ``c L [(8 + 4 r m) h^2 + 4 s h] + 6 h V`` with c = 4 under activation checkpointing else
      3, r the mlp_ratio, m = 3/2 for SwiGLU (recompute FLOPs included).
    """
    conv = spec.get("convention")
    s = float(seq_len)
    if conv == "megatron":
        L, h, a = int(spec["layers"]), float(spec["hidden"]), int(spec["heads"])
        g = int(spec.get("kv_heads", a))
        d = float(spec.get("head_dim", h / a))
        ffn = float(spec["ffn"])
        k = int(spec.get("top_k", 1))
        m = 1.5 if spec.get("gated", False) else 1.0
        shared = float(spec.get("shared_ffn", 0))
        V = float(spec["vocab"])
        return 12 * L * h * h * ((1 + g / a + s / h) * (a * d / h) + (ffn / h) * k * m + (shared / h) * m
                                 + V / (2 * L * h))
    if conv == "internevo":
        L, h, V = int(spec["layers"]), float(spec["hidden"]), float(spec["vocab"])
        r = float(spec.get("mlp_ratio", 4.0)) * (1.5 if spec.get("swiglu", True) else 1.0)
        c = 4 if spec.get("checkpoint", False) else 3
        return c * L * ((8 + 4 * r) * h * h + 4 * s * h) + 6 * h * V
    raise InputError(f"unknown FLOP convention {conv!r}; known: {', '.join(FLOP_CONVENTIONS)}.")


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class MetricSpec:
    metric: str
    published: float
    field: str  # where the figure sits in the published row, e.g. reported.tokens_per_s_per_gpu


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # preset name or a key of the cases file's `models:`
    config: dict[str, Any] | None  # inline config.json (None for presets)
    hardware: str
    layout: dict[str, Any]
    seq_len: int
    global_batch: int
    metrics: tuple[MetricSpec, ...]
    flops: dict[str, Any] | None = None
    loss: str = "full"
    imbalance: float | None = None  # busiest EP rank's load over the mean; None: the sourced default
    notes: tuple[str, ...] = ()
    recompute_every_mm: int = 0  # selective recompute also redoes every n-th forward mm (torchtitan: 2)
    source: str = ""  # the publication (leave-one-source-out groups rows by it)
    exclude: str | None = None  # priced and shown, left out of the summary, for this reason
    known_gap: str | None = None  # counted; also reported apart (the max without known gaps)


@dataclass(frozen=True)
class NotExpressible:
    id: str
    model: str
    reason: str
    check: dict[str, Any] | None = None  # how tests/test_validate.py verifies the reason
    fit_check: dict[str, Any] | None = None  # the layout of a run that ran, for the fit check only


def _read_yaml(path: str | Path, key: str, what: str) -> dict[str, Any]:
    """A YAML mapping that holds a `key` list (exit 2 naming the file otherwise)."""
    data = read_yaml(path, what)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise InputError(f"{what} {path} needs a top-level `{key}:` list.")
    return data


def load_published(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """{row id: row} of the published-results file."""
    data = _read_yaml(path or PUBLISHED_PATH, "results", "the published-results file")
    return {row["id"]: row for row in data["results"]}


def _need(entry: dict, key: str, cid: str) -> Any:
    if key not in entry:
        raise InputError(f"validation case {cid!r} lacks {key!r}.")
    return entry[key]


def load_cases(path: str | Path | None = None,
               published: dict[str, dict[str, Any]] | None = None) -> tuple[list[Case], list[NotExpressible]]:
    """Parse the cases file into expressible cases and not-expressible rows (file order)."""
    data = _read_yaml(path or CASES_PATH, "cases", "the validation cases file")
    models = data.get("models") or {}
    published = published if published is not None else load_published()
    cases: list[Case] = []
    skipped: list[NotExpressible] = []
    for entry in data["cases"]:
        cid = entry["id"]
        row = published.get(cid, {})
        if entry.get("expressible", True) is False:
            fit_check = entry.get("fit_check")
            if fit_check and fit_check.get("config") is None and fit_check.get("model") in models:
                fit_check = {**fit_check, "config": models[fit_check["model"]]}
            skipped.append(NotExpressible(id=cid, model=str(row.get("model", entry.get("model", ""))),
                                          reason=_need(entry, "reason", cid), check=entry.get("check"),
                                          fit_check=fit_check))
            continue
        model = _need(entry, "model", cid)
        config = entry.get("config")
        if config is None and model in models:
            config = models[model]
        metrics = tuple(MetricSpec(metric=m["metric"], published=float(m["published"]), field=m.get("field", ""))
                        for m in _need(entry, "metrics", cid))
        for m in metrics:
            if m.metric not in METRICS:
                raise InputError(f"validation case {cid!r}: unknown metric {m.metric!r}; known: {', '.join(METRICS)}.")
            if m.metric in ("tflops_per_gpu",) and not entry.get("flops"):
                raise InputError(f"validation case {cid!r}: a {m.metric} metric needs a `flops` convention.")
        cases.append(Case(
            id=cid, model=str(model), config=config, hardware=_need(entry, "hardware", cid),
            layout=dict(_need(entry, "layout", cid)), seq_len=int(_need(entry, "seq_len", cid)),
            global_batch=int(_need(entry, "global_batch", cid)), metrics=metrics, flops=entry.get("flops"),
            loss=entry.get("loss", "full"),
            imbalance=float(entry["imbalance"]) if entry.get("imbalance") is not None else None,
            notes=tuple(entry.get("notes") or ()), recompute_every_mm=int(entry.get("recompute_every_mm", 0)),
            source=str(entry.get("source", "")), exclude=entry.get("exclude"), known_gap=entry.get("known_gap"),
        ))
    return cases, skipped


def published_field(row: dict[str, Any], dotted: str) -> Any:
    """The value at `reported.tokens_per_s_per_gpu`-style paths of a published row."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# ----------------------------------------------------------------------------- report
@dataclass
class ValidationRow:
    id: str
    model: str
    hardware: str
    layout: str  # one-line summary
    metric: str
    published: float
    predicted: float
    error: float  # predicted / published - 1
    seq_len: int
    global_batch: int
    notes: list[str] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)  # Estimate.to_dict() of the case
    source: str = ""
    calibration: bool = False  # a profile constant of its hardware was fitted on this row
    excluded: str | None = None  # left out of the summary, for this reason
    known_gap: str | None = None

    @property
    def kind(self) -> str:
        return "memory" if self.metric in MEMORY_METRICS else "throughput"


@dataclass
class FitRow:
    """The fit check of one published run: its predicted peak against the device memory (and the
    published peak, where one is published)."""

    id: str
    source: str
    hardware: str
    layout: str
    allocated_gib: float  # what must fit
    reserved_gib: float  # with the allocator's overhead (what frameworks report as reserved)
    capacity_gib: float
    published_gib: float | None = None
    error: float | None = None  # reserved / published - 1 (torchtitan publishes the reserved peak)

    @property
    def fits(self) -> bool:
        return self.allocated_gib <= self.capacity_gib

    @property
    def within_published(self) -> bool:
        return self.error is None or abs(self.error) <= FIT_TOLERANCE


#: The fit check's tolerance against a published peak.
FIT_TOLERANCE = 0.10


@dataclass
class ValidationReport:
    rows: list[ValidationRow]
    not_expressible: list[NotExpressible]
    failed: list[dict[str, str]]  # expressible cases the estimator rejected: {id, error}
    summary: dict[str, Any]
    elapsed_s: float
    fit: list[FitRow] = field(default_factory=list)
    loso: dict[str, Any] | None = None  # leave-one-source-out (run_validation(loso=True))

    def to_dict(self, details: bool = True) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["kind"] = r.kind
            if not details:
                d.pop("estimate")
            rows.append(d)
        out = {
            "rows": rows,
            "not_expressible": [asdict(n) for n in self.not_expressible],
            "failed": list(self.failed),
            "fit_check": [asdict(f) | {"fits": f.fits, "within_published": f.within_published} for f in self.fit],
            "summary": dict(self.summary),
            "elapsed_s": self.elapsed_s,
        }
        if self.loso is not None:
            loso = dict(self.loso)
            loso["rows"] = [{k: v for k, v in asdict(r).items() if k != "estimate"} for r in loso.get("rows", [])]
            out["loso"] = loso
        return out


def _stats(rows: list[ValidationRow]) -> dict[str, Any]:
    if not rows:
        return {"count": 0, "median_abs_error": None, "max_abs_error": None, "max_id": None}
    errs = [abs(r.error) for r in rows]
    worst = max(rows, key=lambda r: abs(r.error))
    return {"count": len(rows), "median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
            "max_id": worst.id, "mean_error": statistics.fmean(r.error for r in rows)}


def summarize(rows: list[ValidationRow]) -> dict[str, Any]:
    """Median and max absolute error, throughput-type and memory rows separately, over the rows
    not excluded: all of them, the held-out ones (no profile constant fitted on them) and the
    calibration ones; the throughput max also without the rows of known gaps."""
    scored = [r for r in rows if not r.excluded]
    out: dict[str, Any] = {}
    for kind in ("throughput", "memory"):
        of_kind = [r for r in scored if r.kind == kind]
        out[kind] = _stats(of_kind)
        out[kind]["held_out"] = _stats([r for r in of_kind if not r.calibration])
        out[kind]["calibration"] = _stats([r for r in of_kind if r.calibration])
        out[kind]["without_known_gaps"] = _stats([r for r in of_kind if not r.known_gap])
    out["excluded"] = sorted({r.id for r in rows if r.excluded})
    return out


def layout_summary(layout, grad_accum: int | None = None) -> str:
    """One-line layout, e.g. 'n64 fsdp64 ep8 tp2 pp4v8 mb1 ga16 rc=full fp8'."""
    parts = [f"n{layout.devices}", f"fsdp{layout.fsdp}"]
    if layout.hsdp_replicas > 1 and layout.fsdp > 1:
        parts[-1] += f"x{layout.hsdp_replicas}"
    for name in ("ep", "sp", "tp"):
        v = getattr(layout, name)
        if v > 1:
            parts.append(f"{name}{v}")
    if layout.pp > 1:
        parts.append(f"pp{layout.pp}" + (f"v{layout.vpp}" if layout.vpp > 1 else ""))
    parts.append(f"mb{layout.micro_batch}")
    if grad_accum is not None:
        parts.append(f"ga{grad_accum}")
    rc = layout.recompute
    parts.append(f"rc={rc:g}" if isinstance(rc, float) else f"rc={rc}")
    if layout.offload:
        parts.append("off=" + ",".join(layout.offload))
    parts.append(layout.precision)
    return " ".join(parts)


def predict_metric(metric: str, est, case: Case, profile) -> float:
    """The estimator's value of `metric` for `case` (see the module docstring for conversions)."""
    tps = est.tokens_per_s_per_device
    if metric == "tokens_per_s_per_gpu":
        return tps
    if metric == "memory_gib":
        return est.memory.total / 2**30
    if metric == "tflops_per_gpu":
        return tps * flops_per_token(case.flops, case.seq_len) / 1e12
    if metric == "mfu":
        if case.flops:
            peak = float(case.flops.get("peak_tflops", profile.peak_flops("bf16") / 1e12)) * 1e12
            return tps * flops_per_token(case.flops, case.seq_len) / peak
        return est.mfu
    raise InputError(f"unknown metric {metric!r}")


def _model_config(case: Case):
    from xplan.runtime import load_config
    from xplan.runtime.models import model_config_from_dict

    if case.config is not None:
        return model_config_from_dict(dict(case.config), name=case.model)
    return load_config(case.model)


def case_layout(case: Case):
    """The case's Layout; its loss kernel is the trace's unless the layout names one."""
    from xplan.layout import layout_from_dict

    layout_dict = dict(case.layout)
    kernels = dict(layout_dict.get("kernels") or {})
    kernels.setdefault("loss", case.loss)
    layout_dict["kernels"] = kernels
    return layout_from_dict(layout_dict)


def case_imbalance(case: Case, layout, config) -> float:
    """The case's imbalance, or the sourced default (`cost_models.routing`) when it states none."""
    from xplan.cost_models.routing import default_imbalance

    return case.imbalance if case.imbalance is not None else default_imbalance(layout, config)


def price_case(case: Case, trace, config, profile):
    """(Layout, Estimate) of one case (raises InputError if the layout is invalid)."""
    from xplan.cost_models import estimate

    layout = case_layout(case)
    return layout, estimate(trace, config, layout, profile, case.global_batch,
                            imbalance=case_imbalance(case, layout, config),
                            recompute_every_mm=case.recompute_every_mm)


def evaluate_case(case: Case, trace, config, profile, calibration: bool = False) -> list[ValidationRow]:
    """Price one case and compare each of its metrics (raises InputError if the layout is invalid)."""
    layout, est = price_case(case, trace, config, profile)
    details = est.to_dict()
    out = []
    for m in case.metrics:
        predicted = predict_metric(m.metric, est, case, profile)
        out.append(ValidationRow(
            id=case.id, model=case.model, hardware=case.hardware, layout=layout_summary(layout, est.grad_accum),
            metric=m.metric, published=m.published, predicted=predicted, error=predicted / m.published - 1.0,
            seq_len=case.seq_len, global_batch=case.global_batch, notes=list(case.notes), estimate=details,
            source=case.source, calibration=calibration, excluded=case.exclude, known_gap=case.known_gap,
        ))
    return out


def fit_row(case: Case, est, profile) -> FitRow:
    """The fit check of a priced case: allocated and reserved peak against the device memory."""
    published = next((m.published for m in case.metrics if m.metric == "memory_gib"), None)
    reserved = est.memory.total / 2**30
    return FitRow(id=case.id, source=case.source, hardware=case.hardware,
                  layout=layout_summary(est.layout, est.grad_accum), allocated_gib=est.memory.allocated / 2**30,
                  reserved_gib=reserved, capacity_gib=profile.hbm_bytes() / 2**30, published_gib=published,
                  error=reserved / published - 1.0 if published else None)


def fit_check_case(entry: NotExpressible) -> Case:
    """A not-expressible row's `fit_check` layout as a Case (priced for the fit check only)."""
    spec = dict(entry.fit_check or {})
    return Case(id=entry.id, model=str(spec["model"]), config=spec.get("config"), hardware=spec["hardware"],
                layout=dict(spec["layout"]), seq_len=int(spec["seq_len"]), global_batch=int(spec["global_batch"]),
                metrics=(), loss=spec.get("loss", "full"),
                imbalance=float(spec["imbalance"]) if spec.get("imbalance") is not None else None,
                recompute_every_mm=int(spec.get("recompute_every_mm", 0)), source=str(spec.get("source", "")))


def calibration_rows(profile) -> set[str]:
    """Row ids any constant of `profile` was fitted on (`fitted_on`)."""
    return {row for entry in profile.fitted_on.values() for row in entry.rows}


def run_validation(cache_dir: str | Path | None = None, progress: Progress | None = None,
                   only: str | None = None, cases_path: str | Path | None = None,
                   published_path: str | Path | None = None, loso: bool = False) -> ValidationReport:
    """Validate every expressible case (those whose id contains `only`, when given), fit-check
    every priced run, and with `loso` score each source's rows with what is fitted refitted
    without them (`xplan.app.validation_loso`).

    Traces are shared: cases are grouped by (model, seq_len, loss kernel) and each group is traced
    once (trace_model also caches on disk under `cache_dir`).
    """
    from xplan.hw_profiles import load_profile
    from xplan.planner.trace import trace_model

    start = time.perf_counter()
    published = load_published(published_path)
    cases, skipped = load_cases(cases_path, published)
    if only:
        cases = [c for c in cases if only in c.id]
        skipped = [s for s in skipped if only in s.id]
        if not cases and not skipped:
            raise InputError(f"no published row id contains {only!r}; run `xplan validate` without --only to "
                             "see every id.")
    fit_only = [fit_check_case(n) for n in skipped if n.fit_check]
    groups: dict[tuple[str, int, str], list[Case]] = {}
    for c in cases + fit_only:
        groups.setdefault((c.model, c.seq_len, traced_loss(c.loss)), []).append(c)
    profiles: dict[str, Any] = {}
    rows: list[ValidationRow] = []
    fit: list[FitRow] = []
    failed: list[dict[str, str]] = []
    priced: dict[str, tuple[Case, Any, Any]] = {}  # case id -> (case, trace, config): what LOSO re-prices
    total = len(groups)
    for i, ((model, seq, loss), members) in enumerate(groups.items()):
        if progress is not None:
            progress(i, total, f"{model} @ {seq}")
        config = _model_config(members[0])
        trace = trace_model(config, seq, micro_batch=1, loss=loss, cache_dir=cache_dir)
        for case in members:
            if case.hardware not in profiles:
                profiles[case.hardware] = load_profile(case.hardware)
            profile = profiles[case.hardware]
            try:
                _, est = price_case(case, trace, config, profile)
                fit.append(fit_row(case, est, profile))
                if case.metrics:
                    rows.extend(evaluate_case(case, trace, config, profile, case.id in calibration_rows(profile)))
                    priced[case.id] = (case, trace, config)
            except InputError as exc:
                failed.append({"id": case.id, "error": str(exc)})
    if progress is not None:
        progress(total, total, "done")
    order = {c.id: i for i, c in enumerate(cases + fit_only)}
    rows.sort(key=lambda r: order[r.id])
    fit.sort(key=lambda r: order[r.id])
    summary = summarize(rows)
    summary["expressible_cases"] = len(cases)
    summary["not_expressible"] = len(skipped)
    summary["failed"] = len(failed)
    summary["fit_check"] = {"runs": len(fit), "fit": sum(f.fits for f in fit),
                            "misses": [f.id for f in fit if not f.fits],
                            "off_published": [f.id for f in fit if not f.within_published]}
    loso_result = None
    if loso:
        from xplan.app.validation_loso import leave_one_source_out

        loso_result = leave_one_source_out(rows, priced, profiles)
        summary["loso"] = loso_result["summary"]
    elapsed = time.perf_counter() - start
    summary["elapsed_s"] = elapsed
    return ValidationReport(rows=rows, not_expressible=skipped, failed=failed, summary=summary, elapsed_s=elapsed,
                            fit=fit, loso=loso_result)
