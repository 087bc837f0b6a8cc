"""The accuracy guard (issue #18): `xplan validate` over the shipped set, with leave-one-source-out.

- the committed per-row table (cost_models/validation_table.md) is what the code renders now;
- the held-out median throughput error stays within one point of the committed one;
- every published run the set can price is predicted to fit, and within 10% of a published peak;
- every not-expressible row fails the estimator (or lacks the published figures) as its reason says;
- constants fitted on rows name rows that exist, and no row depends on a constant fitted to this
  project's own runs (host.dispatch_us binds no validation row).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xplan.app.validation import (
    CASES_PATH,
    FIT_TOLERANCE,
    PUBLISHED_PATH,
    load_cases,
    load_published,
    published_field,
    run_validation,
)
from xplan.app.validation_table import GUARD_POINTS, TABLE_PATH, committed_held_out_median, render
from xplan.errors import InputError
from xplan.hw_profiles import load_profile, profile_names
from xplan.layout import check_layout, layout_from_dict
from xplan.runtime import load_config

ROOT = Path(__file__).resolve().parents[1]
EXTENDED = sorted((CASES_PATH.parent / "extended").glob("*.yaml"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_validation(cache_dir=tmp_path_factory.mktemp("trace-cache"), loso=True)


def test_committed_table_is_current(report):
    rendered = render(report)
    assert TABLE_PATH.read_text() == rendered, (
        "cost_models/validation_table.md is stale: run `python -m xplan.app.validation_table --write` and review "
        "the diff")


def test_held_out_median_does_not_rise(report):
    committed = committed_held_out_median(TABLE_PATH.read_text())
    now = report.summary["throughput"]["held_out"]["median_abs_error"]
    assert now <= committed + GUARD_POINTS, (f"held-out median |error| {now:.1%} is more than one point above the "
                                             f"committed {committed:.1%}")


def test_every_published_run_fits(report):
    assert report.fit, "no run was fit-checked"
    misses = [f"{f.id}: {f.allocated_gib:.1f} GiB allocated > {f.capacity_gib:.0f}" for f in report.fit if not f.fits]
    assert not misses, "published runs predicted not to fit: " + "; ".join(misses)
    off = [f"{f.id}: {f.error:+.1%}" for f in report.fit if not f.within_published]
    assert not off, f"predicted peaks more than {FIT_TOLERANCE:.0%} off the published ones: " + "; ".join(off)


def _raises(entry: dict) -> str:
    """The InputError message the estimator gives for a not-expressible row's `check` layout."""
    try:
        layout = layout_from_dict(entry["layout"])
        check_layout(layout, load_config(entry["model"]), int(entry["seq_len"]), int(entry["global_batch"]))
    except InputError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("published_path, cases_path", [(PUBLISHED_PATH, CASES_PATH)] + [(p, p) for p in EXTENDED],
                         ids=["shipped"] + [p.stem for p in EXTENDED])
def test_not_expressible_rows_fail_for_their_stated_reason(published_path, cases_path):
    published = load_published(published_path)
    _, skipped = load_cases(cases_path, published)
    for entry in skipped:
        check = entry.check
        assert check, f"{entry.id}: a not-expressible row needs a `check:` (see the cases file's header)"
        if "error" in check:
            message = _raises(check)
            assert check["error"] in message, (entry.id, message or "the layout was accepted")
        elif "missing" in check:
            row = published[entry.id]
            for dotted in check["missing"]:
                value = published_field(row, dotted)
                assert not isinstance(value, (int, float)) or isinstance(value, bool), (entry.id, dotted, value)
        elif "no_profile" in check:
            assert check["no_profile"] not in profile_names()
            with pytest.raises(InputError):
                load_profile(check["no_profile"])
        else:
            pytest.fail(f"{entry.id}: unknown check {check}")


def test_fitted_on_names_existing_rows_or_measurements():
    ids = set(load_published())
    for path in EXTENDED:
        ids |= set(load_published(path))
    for name in profile_names():
        for constant, entry in load_profile(name).fitted_on.items():
            for row in entry.rows:
                assert row in ids or (ROOT / row).is_file(), (name, constant, row)


def test_no_row_depends_on_a_constant_fitted_to_the_projects_own_runs(report):
    """host.dispatch_us (fitted to gpu_check runs) binds no validation row: none is host-bound."""
    for r in report.rows:
        assert r.estimate["time_s"].get("host_bound", 0.0) == 0.0, r.id
