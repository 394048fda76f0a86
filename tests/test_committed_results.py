"""The committed results: every file dvc.yaml declares a metric holds numbers only (its
text is in the info file beside it, a plain output) and reads back through its schema; and
the committed report is what the code makes of the committed metrics: rebuilding
reports/*.csv, reports/comparison.md and the README's results block from metrics/ and
plots/train gives the committed files byte for byte."""

from __future__ import annotations

import json
import math
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from metalab.params import load_params
from metalab.records import INFO_SUFFIX, info_path, is_info_file, schema_for
from metalab.report import build_report, render_readme_table, update_readme

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["comparison.md", "comparison.csv", "pairs.csv", "accuracy.csv", "rl.csv"]
METRICS = ROOT / "metrics"


@cache
def declared() -> tuple[frozenset[Path], frozenset[Path]]:
    """(metrics, uncached plain outputs) of every stage of dvc.yaml, foreach expanded."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        outs = [out for stage in repo.index.stages for out in stage.outs]
    metrics = frozenset(ROOT / str(out.def_path) for out in outs if out.metric)
    plain = frozenset(
        ROOT / str(out.def_path) for out in outs if not (out.metric or out.plot or out.use_cache)
    )
    return metrics, plain


def numeric_leaves_only(value: Any) -> bool:
    """Whether every leaf of JSON `value` is a number, a boolean or null (no string, no
    list)."""
    if isinstance(value, dict):
        return all(numeric_leaves_only(item) for item in value.values())
    return value is None or (isinstance(value, int | float) and math.isfinite(value))


def test_numeric_leaves_only_tells_text_from_numbers():
    assert numeric_leaves_only({"a": 1, "b": {"c": 0.5, "d": None, "e": True}})
    assert not numeric_leaves_only({"a": 1, "b": {"c": "maml"}})
    assert not numeric_leaves_only({"a": [1, 2]})


def test_every_committed_metrics_file_is_declared_and_every_declared_one_is_committed():
    metrics, _ = declared()
    committed = {path for path in METRICS.rglob("*.json") if not is_info_file(path)}
    assert len(metrics) > 20 and metrics == committed


@pytest.mark.parametrize(
    "path", sorted(declared()[0]), ids=lambda path: str(path.relative_to(METRICS))
)
def test_declared_metrics_file_holds_numbers_only_and_reads_back(path):
    assert numeric_leaves_only(json.loads(path.read_text())), f"{path}: text in a DVC metric"
    schema = schema_for(path.relative_to(METRICS))
    record = schema.read(path)  # with the text from its info file
    assert record.file_texts()[0] == path.read_text()


def test_every_info_file_is_an_uncached_output_beside_its_metrics_file():
    metrics, plain = declared()
    info_files = sorted(METRICS.rglob(f"*{INFO_SUFFIX}"))
    assert info_files and {path for path in plain if is_info_file(path)} == set(info_files)
    for info in info_files:
        metrics_file = info.with_name(info.name.removesuffix(INFO_SUFFIX) + ".json")
        assert metrics_file in metrics and info_path(metrics_file) == info


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    params = load_params(ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("report")
    shutil.copytree(ROOT / "plots" / "train", out / "plots" / "train")
    files = build_report(
        ROOT / "metrics",
        out / "plots",
        out / "reports",
        sort_by=params.report.sort_by,
        pairs=params.report.pairs,
        experiments={name: e.algorithm for name, e in params.experiments.items()},
        settings=params.evaluation_settings(),
    )
    return out, files


@pytest.mark.parametrize("name", REPORTS)
def test_committed_report_file_is_rebuilt_exactly(rebuilt, name):
    out, _ = rebuilt
    assert (out / "reports" / name).read_text() == (ROOT / "reports" / name).read_text()


def test_committed_readme_block_is_rebuilt_exactly(rebuilt, tmp_path):
    _, files = rebuilt
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    assert not update_readme(readme, render_readme_table(files.table))  # already up to date
