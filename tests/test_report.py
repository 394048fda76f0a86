"""The comparison report from fake metric files: rows, ranking, paired comparisons,
missing values, plots and the README block."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_evaluation import load_stage

from metalab.params import validate_params
from metalab.records import EvaluationMetrics, SettingResult, TrainSummary
from metalab.records.vision import StepSelectionResult
from metalab.report import build_report, render_readme_table, update_readme
from metalab.report.plots import pareto_front
from metalab.report.tables import durations

SETTINGS = ["5w1s", "20w1s"]
CONFIGURED = {
    "maml": "maml",
    "fomaml": "maml",
    "protonets": "protonets",
    "cavia": "cavia",
    "ghost": "reptile",  # configured, never run: its algorithm comes from params
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_train(root: Path, name: str, algorithm: str, seconds: float, loss_scale: float) -> None:
    (root / "metrics" / "train").mkdir(parents=True, exist_ok=True)
    (root / "plots" / "train").mkdir(parents=True, exist_ok=True)
    summary = TrainSummary(
        experiment=name,
        algorithm=algorithm,
        iterations=100,
        tasks=3200,
        final_loss=0.5 * loss_scale,
        min_loss=0.4 * loss_scale,
        final_train_accuracy=0.5,
        best_validation_accuracy=0.9,
        best_iteration=100,
        training_seconds=seconds,
        tasks_per_s=3200 / seconds,
        total_parameters=113_000,
        trainable_parameters=112_000,
        parameters_per_training_task=35.0,
        precision="fp32",
        processes=1,
        peak_memory_mb=800.0,
        mlflow_run_id=None,
    )
    summary.write(root / "metrics" / "train" / f"{name}.json")
    iterations = np.arange(1, 101)
    curve = pd.DataFrame(
        {
            "iteration": iterations,
            "loss": loss_scale * (0.4 + 1.2 / np.sqrt(iterations)),
            "accuracy": 0.5,
            "lr": 0.001,
        }
    )
    (root / "plots" / "train" / f"{name}.csv").write_text(curve.to_csv(index=False))


def write_eval(
    root: Path,
    name: str,
    algorithm: str,
    after: dict[str, list[float]],
    before: dict[str, list[float]] | None = None,
    unsupported: dict[str, str] | None = None,
    episode_set: str = "same",
) -> None:
    """Per-episode accuracies -> the evaluate stage's two files (summary = their mean)."""
    (root / "metrics" / "eval").mkdir(parents=True, exist_ok=True)
    rows, settings = [], {}
    for setting, values in after.items():
        values = np.array(values)
        previous = np.array(before[setting]) if before else np.full(values.size, np.nan)
        ci = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
        n_way, k_shot = (int(part) for part in setting.removesuffix("s").split("w"))
        settings[setting] = SettingResult(
            n_way=n_way,
            k_shot=k_shot,
            episodes=values.size,
            adaptation_steps=1 if before else None,
            accuracy=values.mean(),
            ci95=ci,
            accuracy_before=previous.mean() if before else None,
            ci95_before=0.01 if before else None,
            gain=(values - previous).mean() if before else None,
            gain_ci95=0.02 if before else None,
            seconds_per_episode=0.01,
            episode_set=episode_set,
        )
        for episode, (a, b) in enumerate(zip(values, previous, strict=True)):
            rows.append((setting, episode, b, a, 0.01))
    metrics = EvaluationMetrics(
        experiment=name,
        algorithm=algorithm,
        settings=settings,
        unsupported=unsupported or {},
        evaluation_seconds=0.01 * len(rows),
        episodes=len(rows),
        peak_memory_mb=300.0,
    )
    metrics.write(root / "metrics" / "eval" / f"{name}.json")
    table = pd.DataFrame(
        rows, columns=["setting", "episode", "accuracy_before", "accuracy_after", "seconds"]
    )
    (root / "metrics" / "eval" / f"{name}.episodes.csv").write_text(table.to_csv(index=False))


@pytest.fixture
def project(tmp_path) -> Path:
    """maml (best), fomaml, protonets (no before), cavia (20-way unsupported), and
    'ghost' configured in params but never run."""
    write_train(tmp_path, "maml", "maml", seconds=1000.0, loss_scale=1.0)
    write_train(tmp_path, "fomaml", "maml", seconds=400.0, loss_scale=1.2)
    write_train(tmp_path, "protonets", "protonets", seconds=100.0, loss_scale=0.8)
    write_train(tmp_path, "cavia", "cavia", seconds=2000.0, loss_scale=1.5)
    write_eval(
        tmp_path,
        "maml",
        "maml",
        {"5w1s": [1.0, 0.8, 0.6], "20w1s": [0.9, 0.9, 0.6]},
        before={"5w1s": [0.2, 0.2, 0.2], "20w1s": [0.05, 0.05, 0.05]},
    )
    write_eval(
        tmp_path,
        "fomaml",
        "maml",
        {"5w1s": [0.5, 0.6, 0.7], "20w1s": [0.8, 0.8, 0.5]},
        before={"5w1s": [0.2, 0.2, 0.2], "20w1s": [0.05, 0.05, 0.05]},
    )
    write_eval(tmp_path, "protonets", "protonets", {"5w1s": [0.7, 0.7, 0.6], "20w1s": [1, 1, 1]})
    write_eval(
        tmp_path,
        "cavia",
        "cavia",
        {"5w1s": [0.2, 0.3, 0.4]},
        before={"5w1s": [0.2, 0.2, 0.2]},
        unsupported={"20w1s": "cavia (trained 5-way) cannot handle a 20-way task"},
    )
    return tmp_path


def build(root: Path, pairs=None, experiments=None, sort_by: str = "5w1s"):
    return build_report(
        root / "metrics",
        root / "plots",
        root / "reports",
        sort_by=sort_by,
        pairs=pairs if pairs is not None else [["maml", "fomaml"]],
        experiments=experiments or CONFIGURED,
        settings=SETTINGS,
    )


def test_comparison_rows_ranked_best_marked_missing_shown(project):
    files = build(project)

    table = pd.read_csv(files.comparison_csv)
    # 5w1s means: maml 0.8, protonets 0.6667, fomaml 0.6, cavia 0.3; ghost unknown -> last
    assert list(table["experiment"]) == ["maml", "protonets", "fomaml", "cavia", "ghost"]
    assert list(table["best"]) == [True, False, False, False, False]
    maml = table.iloc[0]
    assert maml["5w1s_accuracy"] == pytest.approx(0.8)
    assert maml["5w1s_gain"] == pytest.approx(0.6)
    assert maml["total_parameters"] == 113_000 and maml["training_seconds"] == 1000
    assert math.isnan(table.set_index("experiment").loc["cavia", "20w1s_accuracy"])
    assert table.iloc[-1][["final_loss", "5w1s_accuracy"]].isna().all()

    text = files.markdown.read_text()
    assert "| ★ maml | maml | **80.00 ± 22.63** | 80.00 ± 19.60 |" in text
    assert "| **100.00 ± 0.00** |" in text  # protonets is the best 20w1s: bold there
    assert "| ghost | reptile | - | - |" in text
    assert "| protonets | - | - | - | - |" in text  # no before/gain for ProtoNets
    assert "| maml | 20.00 ± 1.00 | +60.00 ± 2.00 |" in text.replace("★ ", "")
    assert "16.7 min" in text and "113,000" in text
    assert "ghost: no training metrics" in text
    assert "cavia: 20w1s not evaluated: cavia (trained 5-way) cannot handle" in text


def test_paired_comparisons_by_hand_and_unpairable_pairs(project):
    write_eval(project, "other_set", "maml", {"5w1s": [1, 1, 1]}, episode_set="different")
    files = build(
        project,
        pairs=[["maml", "fomaml"], ["maml", "protonets", "cavia"], ["maml", "ghost"], ["solo"]],
        experiments=["maml", "fomaml", "protonets", "cavia", "ghost", "other_set"],
    )
    pairs = pd.read_csv(files.pairs_csv)
    text = files.markdown.read_text()
    first = pairs[(pairs["a"] == "maml") & (pairs["b"] == "fomaml") & (pairs["setting"] == "5w1s")]
    # differences 0.5, 0.2, -0.1: mean 0.2, s = 0.3 -> 1.96 * 0.3 / sqrt(3)
    assert first["difference"].item() == pytest.approx(0.2)
    assert first["ci95"].item() == pytest.approx(1.96 * 0.3 / math.sqrt(3))
    assert first["episodes"].item() == 3
    assert first["verdict"].item() == "no significant difference"
    # a group of three gives its three pairs, in listed order
    triples = pairs[
        pairs["a"].isin(["maml", "protonets"]) & pairs["b"].isin(["protonets", "cavia"])
    ]
    assert sorted(set(zip(triples["a"], triples["b"], strict=True))) == [
        ("maml", "cavia"),
        ("maml", "protonets"),
        ("protonets", "cavia"),
    ]
    cavia_20 = pairs[(pairs["b"] == "cavia") & (pairs["setting"] == "20w1s")]
    assert cavia_20["difference"].isna().all()
    assert cavia_20["note"].str.contains("cavia has no per-episode results for 20w1s").all()
    maml_cavia = pairs[
        (pairs["a"] == "maml") & (pairs["b"] == "cavia") & (pairs["setting"] == "5w1s")
    ]
    # differences 0.8, 0.5, 0.2: mean 0.5, s = 0.3 -> significant
    assert maml_cavia["difference"].item() == pytest.approx(0.5)
    assert maml_cavia["verdict"].item() == "maml better"
    ghost = pairs[pairs["b"] == "ghost"]
    assert ghost["note"].str.contains("ghost has no per-episode results").all()
    assert "report.pairs entry ['solo']: needs at least two experiments" in text
    assert "| maml | fomaml | 5w1s | 80.00 | 60.00 | +20.00 ± 33.95 | 3 |" in text
    files = build(project, pairs=[["maml", "other_set"]], experiments=["maml", "other_set"])
    other = pd.read_csv(files.pairs_csv)
    assert other["note"].str.contains("different episode sets").any()


def test_plots_are_valid_pngs(project):
    files = build(project)

    names = sorted(path.name for path in files.plots)
    assert names == [
        "accuracy.png",
        "budget.png",
        "pareto.png",
        "rl_adaptation.png",
        "speed_memory.png",
        "training_loss.png",
    ]
    # No RL metrics and no validation curves in this project: those figures say so instead
    # (tested in test_report_rl and test_report_seeds).
    for path in (p for p in files.plots if p.name not in ("rl_adaptation.png", "budget.png")):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        assert len(data) > 15_000, path
        with Image.open(path) as image:
            assert image.width > 500 and image.height > 200
    accuracy = pd.read_csv(files.accuracy_csv)
    assert len(accuracy) == 7  # 4 x 5w1s + 3 x 20w1s (cavia's 20w1s unsupported)
    row = accuracy[accuracy["label"] == "maml 5w1s"]
    assert row["accuracy"].item() == pytest.approx(80.0)
    assert row["accuracy_before"].item() == pytest.approx(20.0)


def test_figures_get_each_experiments_algorithm_and_one_look(project, monkeypatch):
    """The loss figure's panels follow the learner families: build_report hands it every
    experiment's algorithm (from its metrics, else params.yaml) and one style each."""
    import metalab.report.build as build_module

    seen = {}
    real = build_module.plot_training_loss

    def spy(curves, path, styles=None, algorithms=None):
        seen.update(styles=styles, algorithms=algorithms)
        return real(curves, path, styles, algorithms)

    monkeypatch.setattr(build_module, "plot_training_loss", spy)
    build(project)

    assert seen["algorithms"] == CONFIGURED
    assert set(seen["styles"]) == set(CONFIGURED)
    assert len(set(seen["styles"].values())) == len(CONFIGURED)


def test_report_without_any_results_still_renders(tmp_path):
    files = build(tmp_path, experiments=["maml", "ghost"])

    text = files.markdown.read_text()
    assert "| maml | - | - | - |" in text
    assert "report.sort_by = '5w1s'" not in text  # the setting is configured, just empty
    for path in files.plots:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert pd.read_csv(files.accuracy_csv).empty


def test_pareto_front_by_hand():
    cost = np.array([1.0, 2.0, 3.0, 4.0, 2.0])
    value = np.array([0.5, 0.7, 0.6, 0.9, 0.7])
    # (3, 0.6) is beaten by (2, 0.7); the two (2, 0.7) tie and both stay.
    assert pareto_front(cost, value).tolist() == [True, True, False, True, True]


def test_readme_block_rendered_and_replaced_between_markers(project, tmp_path):
    files = build(project)
    block = render_readme_table(files.comparison_csv)
    lines = block.splitlines()
    assert lines[0] == (
        "| Experiment | Algorithm | 5w1s | 20w1s | Training time | Trainable parameters |"
    )
    assert lines[2] == "| ★ maml | maml | 80.00 ± 22.63 | 80.00 ± 19.60 | 16.7 min | 112,000 |"
    assert lines[-1] == "| ghost | reptile | - | - | - | - |"

    readme = tmp_path / "README.md"
    readme.write_text("# metalab\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nmore\n")
    assert update_readme(readme, block)
    text = readme.read_text()
    assert text.startswith("# metalab\n\n<!-- results:start -->\n| Experiment")
    assert "old" not in text and text.endswith("<!-- results:end -->\n\nmore\n")
    assert not update_readme(readme, block)  # same block: unchanged
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        update_readme(readme, block)
    assert readme.read_text() == "# no markers\n"


def test_report_stage_writes_outputs(project, monkeypatch):
    raw = {
        "episodes": {"settings": SETTINGS},
        "experiments": {"maml": {"algorithm": "maml"}, "cavia": {"algorithm": "cavia"}},
        "report": {"sort_by": "20w1s", "pairs": [["maml", "cavia"]]},
        "tracking": {"enabled": False},
    }
    readme = project / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.chdir(project)

    load_stage("report").main(
        argparse.Namespace(no_progress=True, update_readme=str(readme)), validate_params(raw)
    )

    table = pd.read_csv(project / "reports" / "comparison.csv")
    # configured experiments plus those found on disk, ranked by 20w1s (cavia: none)
    assert list(table["experiment"]) == ["protonets", "maml", "fomaml", "cavia"]
    assert list(table["best"]) == [True, False, False, False]
    pairs = pd.read_csv(project / "reports" / "pairs.csv")
    assert list(pairs["setting"]) == SETTINGS and pairs["a"].eq("maml").all()
    for name in ("training_loss", "accuracy", "pareto", "speed_memory"):
        assert (project / "plots" / f"{name}.png").stat().st_size > 10_000
    assert "| ★ protonets |" in readme.read_text()


def test_durations_share_one_unit_per_column():
    # The longest value picks the unit, so a column never mixes '117.3 s' and '2.8 min'.
    assert durations([117.3, 168.0, None, float("nan")]) == ["2.0 min", "2.8 min", "-", "-"]
    assert durations([45.0, 3.25]) == ["45.0 s", "3.2 s"]
    assert durations([90.0, 7200.0]) == ["0.03 h", "2.00 h"]
    assert durations([None]) == ["-"]
    assert durations([]) == []


def test_chosen_test_time_steps_are_shown_only_when_a_run_has_a_choice(project):
    before = build(project).markdown.read_text()
    assert "Test-time adaptation steps" not in before
    path = project / "metrics" / "eval" / "maml.json"
    record = EvaluationMetrics.read(path)
    record.settings["5w1s"].step_selection = StepSelectionResult(
        trained_setting=True, episodes=0, validation_accuracy={}
    )
    record.settings["20w1s"].adaptation_steps = 2
    record.settings["20w1s"].step_selection = StepSelectionResult(
        trained_setting=False, episodes=100, validation_accuracy={"1": 0.9, "2": 0.925, "5": 0.8}
    )
    record.write(path)

    text = build(project).markdown.read_text()

    section = text.split("## Test-time adaptation steps")[1].split("## Training cost")[0]
    assert "| maml | 1 (trained setting) | 2 (1: 90.00, 2: 92.50, 5: 80.00) |" in section
    assert "fomaml" not in section and "protonets" not in section  # no choice: no row
    # the rest of the report is as without the choice
    assert text.replace("## Test-time adaptation steps" + section, "") == before
