"""The documentation that ships with the repository: it points only at files a clone has, and the
DAG and shard-schema pages list what the code defines (stages, drop reasons, columns, version)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from refany3d import records
from refany3d.records import REJECT_COLUMNS, SHARD_COLUMNS, SHARD_SCHEMA_VERSION
from refany3d.stages.dag import STAGES, is_available

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("architecture.md", "dag.md", "shard-schema.md", "operating.md")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _table_row(text: str, name: str) -> str:
    """The markdown table row whose first cell is `name` in backticks ('' if none)."""
    return next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), "")


def _drop_reasons(stage: str) -> set[str]:
    """The snake_case reason constants a stage module defines (not the names it imports)."""
    module = importlib.import_module(f"refany3d.stages.{STAGES[stage].module}")
    return {
        value
        for name, value in vars(module).items()
        if name.isupper() and name != "STAGE" and isinstance(value, str) and name not in vars(records)
    }


@pytest.mark.parametrize("page", ("README.md", *(f"docs/{p}" for p in PAGES)))
def test_docs_link_only_to_files_in_the_repository(page):
    path = ROOT / page
    text = path.read_text()
    assert "../shared" not in text, f"{page} points outside the repository"
    for target in _LINK.findall(text):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{page}: link {target} does not exist"


def test_readme_links_every_docs_page():
    links = set(_LINK.findall((ROOT / "README.md").read_text()))
    assert {f"docs/{p}" for p in PAGES} <= links


def test_dag_page_lists_every_stage_with_its_parents_and_drop_reasons():
    text = (DOCS / "dag.md").read_text()
    for stage, spec in STAGES.items():
        row = _table_row(text, stage)
        assert row, f"docs/dag.md has no row for stage {stage!r}"
        parents_cell = row.split("|")[3]
        assert all(p in parents_cell for p in spec.parents), f"docs/dag.md: parents of {stage}"
        if is_available(stage):
            missing = {r for r in _drop_reasons(stage) if f"`{r}`" not in row}
            assert not missing, f"docs/dag.md: stage {stage!r} row lacks drop reasons {sorted(missing)}"


def test_shard_schema_page_lists_every_column_of_the_current_version():
    text = (DOCS / "shard-schema.md").read_text()
    assert text.startswith(f"# Shard schema (version {SHARD_SCHEMA_VERSION})")
    for name, *_ in SHARD_COLUMNS + REJECT_COLUMNS:
        assert _table_row(text, name), f"docs/shard-schema.md has no row for column {name!r}"


def test_evaluate_page_exists_and_explains_every_metric():
    from refany3d.evaluate.run import METRICS

    text = (DOCS / "evaluate.md").read_text()
    for name, (value_range, better, _) in METRICS.items():
        row = _table_row(text, name)
        assert row and value_range in row and better in row, f"docs/evaluate.md: {name}"
