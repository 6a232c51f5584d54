"""The README's Duke and demo tables are generated from raw output committed under benchmarks/results: regenerate
each from its per-B-scan CSVs (the demo's from its comparison.json) and compare with what the README (and the run's
own cv_table.md) says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_duke_cpu_cv_table_regenerates_from_its_csvs():
    from benchmarks.duke_cv import summarise, table

    work = RESULTS / "duke_cv_cpu"
    regenerated = table(summarise(work, 5, n_bootstrap=2000, seed=0))
    assert table_rows(regenerated) == table_rows((work / "cv_table.md").read_text())
    assert table_rows(regenerated) == table_rows(readme_block("duke-cv-cpu"))


@pytest.mark.parametrize(
    "run, block", [("duke_native_cpu", "duke-native-cpu"), ("duke_native_cpu_v2", "duke-native-cpu-v2")]
)
def test_duke_native_cpu_cv_table_regenerates_from_its_csvs(run, block):
    from benchmarks.duke_native_cv import summarise, table

    results = RESULTS / run
    folds = sorted(int(p.parent.name.split("-")[1]) for p in results.glob("fold-*/eval") if any(p.iterdir()))
    if not folds:
        raise AssertionError(f"no per-B-scan results under {results}")
    regenerated = table(summarise(results, folds, n_bootstrap=2000, seed=0))
    assert table_rows(regenerated) == table_rows((results / "cv_table.md").read_text())
    assert table_rows(regenerated) == table_rows(readme_block(block))


def test_demo_table_regenerates_from_the_committed_demo_run():
    from benchmarks.update_readme import demo_block

    regenerated = demo_block(RESULTS / "demo_cpu" / "results")
    assert table_rows(regenerated) == table_rows(readme_block("demo-table"))
