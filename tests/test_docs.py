"""Docs that must not drift: the generated recipe reference, and --help with an example everywhere."""

from pathlib import Path

import pytest

from stepdistill.cli import build_parser
from stepdistill.recipe_docs import recipe_reference

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_matches_the_config_classes():
    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert committed == recipe_reference(), "docs/recipes.md is stale: python -m stepdistill.recipe_docs > docs/recipes.md"


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_has_help_with_an_example(name):
    text = _subcommands()[name].format_help()
    assert "example:" in text and f"stepdistill {name}" in text.split("example:", 1)[1]


def test_docs_exist_and_link():
    for doc in ("glossary.md", "adding-an-objective.md", "recipes.md", "evaluation.md"):
        assert (ROOT / "docs" / doc).is_file(), doc


def test_readme_results_match_the_committed_results():
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("run_benchmarks", ROOT / "eval" / "run_benchmarks.py")
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    by_protocol: dict = {}
    for f in sorted((ROOT / "eval" / "results").glob("*__*.json")):
        if f.name.endswith("__missing.json"):
            continue
        data = json.loads(f.read_text())
        by_protocol.setdefault(data["protocol_name"], []).extend(data["records"])
    for records in by_protocol.values():
        records.sort(key=lambda r: (r["kind"] != "teacher", r["model"], r["solver"], r["steps"]))
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- results:start -->\n", 1)[1].split("\n<!-- results:end -->", 1)[0]
    assert block == rb.readme_block(by_protocol), "README results are stale: python eval/run_benchmarks.py --table-only"
