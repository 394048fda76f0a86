"""The report over several training seeds (fake metrics files): per learner the mean and
spread between seeds, the range and Welch rules for pairs; and the budget curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import PNG_SIGNATURE, write_eval, write_train

from metalab.records import TrainSummary
from metalab.report import build_report, render_readme_table
from metalab.report.budget import budget_figure, still_improving, validation_points
from metalab.report.collect import collect_inputs
from metalab.report.seeds import welch_interval
from metalab.report.tables import PAIR_COLUMNS

SETTINGS = ["5w1s"]
# per run: per-episode accuracies on 5w1s (means 0.9, 0.8, 0.7 for maml's three runs)
RUNS = {
    "maml": ("maml", [1.0, 0.8, 0.9]),
    "maml-s1": ("maml", [0.8, 0.8, 0.8]),
    "maml-s2": ("maml", [0.6, 0.7, 0.8]),
    "protonets": ("protonets", [0.5, 0.6, 0.7]),
    "protonets-s1": ("protonets", [0.4, 0.5, 0.6]),
    "fomaml": ("maml", [0.9, 0.8, 0.55]),
}
CONFIGURED = {"maml": "maml", "protonets": "protonets", "fomaml": "maml"}


def write_runs(root: Path, runs: dict) -> None:
    for name, (algorithm, accuracies) in runs.items():
        write_train(root, name, algorithm, seconds=100.0, loss_scale=1.0)
        write_eval(root, name, algorithm, {"5w1s": accuracies})


def build(root: Path, pairs: list[list[str]]):
    return build_report(
        root / "metrics",
        root / "plots",
        root / "reports",
        sort_by="5w1s",
        pairs=pairs,
        experiments=CONFIGURED,
        settings=SETTINGS,
    )


@pytest.fixture
def seeded(tmp_path) -> Path:
    write_runs(tmp_path, RUNS)
    return tmp_path


def test_seed_runs_are_aggregated_into_their_learners_row(seeded):
    files = build(seeded, [["maml", "fomaml"]])
    table = pd.read_csv(files.comparison_csv).set_index("experiment")
    assert sorted(table.index) == ["fomaml", "maml", "protonets"]  # no row per seed
    maml = table.loc["maml"]
    assert maml["5w1s_accuracy"] == pytest.approx(0.9)  # the own run
    assert maml["5w1s_seeds"] == 3
    assert maml["5w1s_seed_mean"] == pytest.approx(0.8)
    assert maml["5w1s_seed_std"] == pytest.approx(0.1)  # ddof=1 of 0.9, 0.8, 0.7
    assert (maml["5w1s_seed_min"], maml["5w1s_seed_max"]) == pytest.approx((0.7, 0.9))
    assert table.loc["protonets", "5w1s_seed_std"] == pytest.approx(math.sqrt(0.005))
    assert table.loc["fomaml", "5w1s_seeds"] == 1 and math.isnan(
        table.loc["fomaml", "5w1s_seed_std"]
    )
    text = files.markdown.read_text()
    assert "## Spread between training seeds" in text
    assert "| maml | 80.00 ± 10.00 [70.00, 90.00] (3) |" in text
    assert "| fomaml |" not in text.split("## Spread between training seeds")[1].split("##")[0]
    readme = render_readme_table(files.table)
    assert "5w1s over seeds" in readme.splitlines()[0]
    assert "| 80.00 [70.00, 90.00] (3) |" in readme


def test_pairs_judged_against_the_spread_between_seeds(seeded):
    files = build(seeded, [["maml", "fomaml"]])
    pairs = pd.read_csv(files.pairs_csv)
    assert list(pairs.columns[: len(PAIR_COLUMNS)]) == PAIR_COLUMNS
    rows = {(row["a"], row["b"]): row for _, row in pairs.iterrows()}
    # the configured pair, with its paired per-episode comparison: fomaml's one run (0.75)
    # against maml's mean 0.8: 0.05, inside maml's range 0.2 (the larger; range rule only)
    one = rows[("maml", "fomaml")]
    assert one["difference"] == pytest.approx(0.15)  # own runs, per episode
    assert one["seed_difference"] == pytest.approx(0.05)
    assert one["seed_range_a"] == pytest.approx(0.2) and one["seed_range_b"] == 0
    assert one["seed_inside_seed_range"]
    assert one["seed_verdict"] == "inside the spread between seeds (range)"
    assert math.isnan(one["seed_welch_ci95"])
    # two learners with seeds, not configured: a row of its own, Welch interval as scipy's
    both = rows[("maml", "protonets")]
    assert math.isnan(both["difference"])  # not a configured pair: no per-episode part
    maml, protonets = np.array([0.9, 0.8, 0.7]), np.array([0.6, 0.5])
    low, high = stats.ttest_ind(maml, protonets, equal_var=False).confidence_interval(0.95)
    assert both["seed_difference"] == pytest.approx(0.25)
    assert both["seed_welch_ci95"] == pytest.approx((high - low) / 2)
    assert not both["seed_inside_seed_range"]  # 0.25 > ranges 0.2 and 0.1
    assert low > 0 and both["seed_verdict"] == "maml better (Welch)"
    text = files.markdown.read_text()
    assert "## Differences against the spread between seeds" in text
    assert "Welch t interval" in text


def test_range_rule_outside_the_seed_range_never_says_better(seeded):
    # fomaml's one run (0.75) against protonets' mean 0.55 over two seeds (range 0.1): the
    # difference exceeds the range, but one run has no spread: no "better" from it
    files = build(seeded, [["protonets", "fomaml"]])
    row = pd.read_csv(files.pairs_csv).set_index(["a", "b"]).loc[("protonets", "fomaml")]
    assert row["seed_difference"] == pytest.approx(-0.2)
    assert not row["seed_inside_seed_range"]
    assert row["seed_verdict"] == "fomaml higher, outside the seed range (range)"
    assert "better (range)" not in files.markdown.read_text()


def test_welch_interval_by_hand_and_inside_when_it_contains_zero():
    a, b = np.array([0.8, 0.9, 1.0]), np.array([0.7, 0.9])
    interval = welch_interval(a, b)
    var_a, var_b = 0.01 / 3, 0.02 / 2
    df = (var_a + var_b) ** 2 / (var_a**2 / 2 + var_b**2 / 1)
    assert interval.df == pytest.approx(df)
    assert interval.ci95 == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(var_a + var_b))
    assert interval.contains_zero  # 0.1 against a half-width of several points
    assert not welch_interval(np.array([0.9, 0.91]), np.array([0.5, 0.51])).contains_zero
    with pytest.raises(ValueError, match="two values per side"):
        welch_interval(a, b[:1])


def test_without_seed_runs_the_tables_keep_their_columns(tmp_path):
    write_runs(tmp_path, {k: v for k, v in RUNS.items() if "-s" not in k})
    files = build(tmp_path, [["maml", "fomaml"]])
    assert not any("seed" in c for c in pd.read_csv(files.comparison_csv).columns)
    assert list(pd.read_csv(files.pairs_csv).columns) == PAIR_COLUMNS
    assert "seeds" not in files.markdown.read_text().lower()
    assert "over seeds" not in render_readme_table(files.table)


def test_a_file_named_like_a_seed_of_no_experiment_stays_a_row(tmp_path):
    write_runs(tmp_path, {"maml": RUNS["maml"], "other-s1": RUNS["maml-s1"]})
    inputs = collect_inputs(tmp_path / "metrics", tmp_path / "plots", {"maml": "maml"}, SETTINGS)
    assert list(inputs.experiments) == ["maml", "other-s1"]
    assert inputs.experiments["maml"].seed_runs == []


# ------------------------------------------------------------------------ budget
def curve(validation: list[float], every: int = 10, seconds: bool = True) -> pd.DataFrame:
    iterations = np.arange(every * len(validation))
    frame = pd.DataFrame({"iteration": iterations, "loss": 1.0, "accuracy": 0.5, "lr": 1e-3})
    if seconds:
        frame["seconds"] = 0.5 * (iterations + 1)
    frame["validation_accuracy"] = np.nan
    frame.loc[frame.index[every - 1 :: every], "validation_accuracy"] = validation
    return frame


def summary(iterations: int, seconds: float) -> TrainSummary:
    fields = {name: 0 for name, field in TrainSummary.model_fields.items() if field.is_required()}
    fields.update(experiment="x", algorithm="maml", precision="fp32", mlflow_run_id=None)
    return TrainSummary(**{**fields, "iterations": iterations, "training_seconds": seconds})


def test_validation_points_use_seconds_or_an_even_pace_from_the_summary():
    points, estimated = validation_points(curve([0.5, 0.6]), None)
    assert not estimated
    assert points["seconds"].tolist() == [5.0, 10.0]  # the column, at the validation rows
    assert points["accuracy"].tolist() == [0.5, 0.6]
    old = curve([0.5, 0.6, 0.7], seconds=False)
    points, estimated = validation_points(old, summary(iterations=30, seconds=90.0))
    assert estimated and points["seconds"].tolist() == pytest.approx([30.0, 60.0, 90.0])
    assert validation_points(old, None) == (None, False)
    assert validation_points(curve([0.5]).drop(columns="validation_accuracy"), None) == (
        None,
        False,
    )


@pytest.mark.parametrize(
    ("validation", "expected"),
    [
        ([0.5, 0.6, 0.7], True),
        ([0.5, 0.7, 0.6], False),
        ([0.7, 0.6, 0.7], False),  # a tie: the train loop kept the first
        ([0.7], None),
    ],
)
def test_still_improving_means_best_at_the_last_validation_point(validation, expected):
    assert still_improving(curve(validation)) is expected


def test_budget_line_names_improving_learners_and_figure_draws_every_seed(seeded):
    for name, validation in {
        "maml": [0.5, 0.6, 0.7],
        "maml-s1": [0.5, 0.7, 0.6],
        "maml-s2": [0.5, 0.6, 0.65],
        "protonets": [0.8, 0.7, 0.75],
        "fomaml": [0.4, 0.5, 0.6],
    }.items():
        (seeded / "plots" / "train" / f"{name}.csv").write_text(
            curve(validation, seconds=name != "fomaml").to_csv(index=False)  # fomaml: old
        )
    files = build(seeded, [])
    text = files.markdown.read_text()
    line = next(row for row in text.splitlines() if row.startswith("Still improving"))
    assert ": maml, fomaml (2 of 3 learners with a validation curve)" in line
    assert "Extra seeds still improving: maml-s2." in line
    budget = seeded / "plots" / "budget.png"
    assert budget in files.plots and budget.read_bytes().startswith(PNG_SIGNATURE)
    inputs = collect_inputs(seeded / "metrics", seeded / "plots", CONFIGURED, SETTINGS)
    figure = budget_figure(inputs)
    try:
        labels = [t.get_text() for a in figure.axes for t in a.get_legend().get_texts()]
        assert sorted(labels) == ["fomaml ↑", "maml ↑ (+2 seeds)", "protonets (+1 seed)"]
        drawn = [line for a in figure.axes for line in a.get_lines() if len(line.get_xdata()) == 3]
        assert len(drawn) == 5  # every run with a validation curve (protonets-s1 has none)
        title = figure._suptitle.get_text()
        assert "seconds estimated as steps × training_seconds / iterations for fomaml" in title
    finally:
        plt.close(figure)
