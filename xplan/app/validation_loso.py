"""Leave-one-source-out validation: score each source's rows with every constant that was fitted
on them refitted without them.

A profile constant's `fitted_on` names the rows it was fitted on (hw_profiles.schema.FittedOn).
For each source (the publication a row comes from, `source:` in the cases file):
- constants fitted on none of its rows keep their value;
- a constant fitted on some of its rows is refitted on its other rows: a one-dimensional search
  (golden section on the logarithm, x1/3..x3 of the current value) for the value that minimises
  the median |log(predicted / published)| over the rows left (every metric of those rows), the
  constants of one profile one after the other; when none of its rows is left it takes its
  declared `prior` (null: the field unpriced).
The source's rows are then priced again with the refitted profiles. When no constant is fitted on
any validation row, leaving a source out changes nothing and the LOSO score is the plain score
(the report says so).
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from xplan.errors import InputError

GOLDEN = (math.sqrt(5) - 1) / 2
SEARCH_STEPS = 24


def with_constant(profile, path: str, value: float | None):
    """`profile` with the number at dotted `path` (e.g. 'compute.gemm.max_fraction.bf16',
    'interconnect.levels[1].bandwidth_gbps') set to `value`; InputError if it is invalid."""
    from xplan.hw_profiles.loader import profile_from_dict

    data = profile.to_dict()
    node: Any = data
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return profile_from_dict(data, origin=f"{profile.name} with {path} = {value}")


def _loss(rows) -> float:
    return statistics.median(abs(math.log(r.predicted / r.published)) for r in rows) if rows else 0.0


def refit_constant(profile, path: str, price, lo: float = 1 / 3, hi: float = 3.0):
    """(value, profile) minimising `_loss(price(profile with path = value))` over value in
    [current x lo, current x hi] (golden section on the log); values the schema rejects cost
    infinity. `price(profile) -> [ValidationRow]` prices the rows left."""
    current = _value(profile, path)
    if not current:
        return current, profile

    def loss(log_value: float) -> float:
        try:
            candidate = with_constant(profile, path, math.exp(log_value))
        except InputError:
            return math.inf
        return _loss(price(candidate))

    a, b = math.log(current * lo), math.log(current * hi)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(SEARCH_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = loss(d)
    best = math.exp((a + b) / 2)
    return best, with_constant(profile, path, best)


def _value(profile, path: str) -> float | None:
    node: Any = profile
    for part in [p for p in re.split(r"\.|\[(\d+)\]", path) if p]:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def leave_one_source_out(rows, priced: dict[str, tuple], profiles: dict[str, Any]) -> dict[str, Any]:
    """The LOSO report: {rows, summary, refits, note}. `rows`: the plain ValidationRows;
    `priced`: case id -> (case, trace, config); `profiles`: hardware name -> Profile."""
    from xplan.app.validation import evaluate_case, summarize

    fitted = {(hw, path): entry for hw, p in profiles.items() for path, entry in p.fitted_on.items()}
    row_ids = set(priced)
    on_rows = {key: [r for r in entry.rows if r in row_ids] for key, entry in fitted.items()}
    if not any(on_rows.values()):
        return {"rows": list(rows), "summary": summarize(rows), "refits": [],
                "note": "no profile constant is fitted on a validation row: leaving a source out refits nothing, "
                        "so the leave-one-source-out score is the plain score"}

    def price(case_ids, hw_profiles) -> list:
        out = []
        for cid in case_ids:
            case, trace, config = priced[cid]
            out.extend(evaluate_case(case, trace, config, hw_profiles[case.hardware]))
        return out

    by_source: dict[str, list[str]] = {}
    for cid, (case, _, _) in priced.items():
        by_source.setdefault(case.source or cid, []).append(cid)
    loso_rows, refits = [], []
    for source, members in by_source.items():
        left_out = set(members)
        changed = dict(profiles)
        for (hw, path), entry in fitted.items():
            if not set(on_rows[(hw, path)]) & left_out:
                continue
            rest = [r for r in on_rows[(hw, path)] if r not in left_out]
            if rest:
                others = dict(changed)

                def price_rest(candidate, hw=hw, rest=rest, others=others):
                    return price(rest, {**others, hw: candidate})

                value, changed[hw] = refit_constant(changed[hw], path, price_rest)
                how = f"refitted on {len(rest)} rows of other sources"
            else:
                value = entry.prior
                changed[hw] = with_constant(changed[hw], path, value)
                how = "its prior (every row it was fitted on is left out)"
            refits.append({"source": source, "hardware": hw, "constant": path, "value": value, "how": how})
        scored = price(members, changed)
        for r in scored:
            r.calibration = any(r.id in on_rows[key] for key in fitted)
        loso_rows.extend(scored)
    order = {r.id: i for i, r in enumerate(rows)}
    loso_rows.sort(key=lambda r: (order.get(r.id, len(order)), r.metric))
    plain = {(r.id, r.metric): r for r in rows}
    for r in loso_rows:  # keep the plain rows' flags (excluded, known gaps)
        base = plain.get((r.id, r.metric))
        if base is not None:
            r.excluded, r.known_gap = base.excluded, base.known_gap
    return {"rows": loso_rows, "summary": summarize(loso_rows), "refits": refits,
            "note": f"{len(refits)} constant refits over {len(by_source)} sources"}
