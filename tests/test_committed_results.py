"""The committed report is what the code makes of the committed metrics: rebuilding
reports/*.csv, reports/comparison.md and the README's results block from metrics/ and
plots/train gives the committed files byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metalab.params import load_params
from metalab.report import build_report, render_readme_table, update_readme

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["comparison.md", "comparison.csv", "pairs.csv", "accuracy.csv", "rl.csv"]


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
