"""The repository's docs/ against the code: the generated knob table, the plan example, links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from xplan.app import docs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ("architecture.md", "plan-schema.md", "cli.md", "extending.md")


def test_committed_knob_table_is_the_rendered_one():
    text = (DOCS / "plan-schema.md").read_text()
    assert docs.committed_table(text) == docs.knob_table(), (
        f"docs/plan-schema.md's layout-knob table differs from xplan/layout.py; regenerate it with "
        f"`{docs.REGENERATE}` and commit the result.")


def test_every_knob_has_a_row():
    from xplan.layout import knobs

    table = docs.knob_table()
    for info in knobs():
        assert f"`{info.flag}`" in table and f"`{info.name}`" in table


def test_write_and_check(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{docs.BEGIN}\nstale\n{docs.END}\nafter\n")
    assert docs.main(["--check", "--path", str(page)]) == 1
    assert docs.main(["--write", "--path", str(page)]) == 0
    assert docs.main(["--check", "--path", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith(f"{docs.END}\nafter\n")
    assert docs.committed_table(text) == docs.knob_table()
    page.write_text("no markers")
    assert docs.main(["--check", "--path", str(page)]) == 2


def test_plan_schema_names_every_plan_field():
    from xplan.plan import DataSettings, OptimizerSettings, PlanFile, ScheduleSettings, TrainingSettings

    text = (DOCS / "plan-schema.md").read_text()
    for model in (PlanFile, TrainingSettings, OptimizerSettings, ScheduleSettings, DataSettings):
        for name in model.model_fields:
            assert f"`{name}`" in text, f"docs/plan-schema.md does not describe {model.__name__}.{name}"
    for kind in DataSettings.model_fields["kind"].annotation.__args__:
        assert f"`{kind}`" in text


def test_example_plan_is_a_valid_plan():
    from xplan.plan import plan_from_dict

    text = (DOCS / "plan-schema.md").read_text()
    example = re.search(r"```yaml\n(xplan_plan: 1.*?)```", text, re.S)
    assert example, "docs/plan-schema.md lost its example plan"
    plan = plan_from_dict(yaml.safe_load(example.group(1)), source="docs example")
    assert plan.layout.devices == 256 and plan.grad_accum == 1


def test_cli_doc_names_every_command():
    from xplan.cli import app

    text = (DOCS / "cli.md").read_text()
    for command in app.registered_commands:
        assert f"`xplan {command.name}" in text, f"docs/cli.md does not describe `xplan {command.name}`"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#]+?\.md)(?:#[^)]*)?\)", text):
        assert (DOCS / target).is_file(), f"docs/{page} links to missing {target}"


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert f"(docs/{page})" in readme
