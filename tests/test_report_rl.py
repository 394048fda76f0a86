"""The meta-RL part of the report, from hand-written metric files (numbers) and the info
files beside them (text)."""

import json

import pytest

from metalab.report.rl import plot_rl_adaptation, rl_markdown, rl_results


def write(path, numbers, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers))
    path.with_name(path.stem + ".info.json").write_text(json.dumps(text))


@pytest.fixture
def metrics(tmp_path):
    for name, before, after in [("maml_rl", -40.0, -14.0), ("anil_rl", -48.0, -18.0)]:
        write(
            tmp_path / "eval_rl" / f"{name}.json",
            {
                "num_tasks": 40,
                "before_adaptation": {"mean_return": before, "ci95": 4.0, "std": 12.9},
                "after_1_steps": {"mean_return": after, "ci95": 1.8, "std": 5.8},
                "after_3_steps": {"mean_return": after + 1, "ci95": 2.0, "std": 6.6},
            },
            {"experiment": name, "algorithm": name, "env": "navigation_2d"},
        )
    write(
        tmp_path / "train_rl" / "maml_rl.json",
        {
            "iterations": 200,
            "training_seconds": 250.0,
            "tasks_per_s": 24.0,
            "final_pre_adaptation_return": -40.0,
            "final_post_adaptation_return": -14.0,
            "peak_memory_mb": 1197.0,
        },
        {
            "experiment": "maml_rl",
            "algorithm": "maml_rl",
            "env": "navigation_2d",
            "mlflow_run_id": None,
        },
    )
    return tmp_path


def test_results_table_rows_and_gain(metrics):
    results = rl_results(metrics)
    assert len(results) == 6
    maml = results[results["experiment"] == "maml_rl"].set_index("steps")
    assert maml.loc[0, "mean_return"] == -40.0 and maml.loc[3, "mean_return"] == -13.0
    text = rl_markdown(results)
    assert (
        "| maml_rl | navigation_2d | -40.00 ± 4.00 | -14.00 ± 1.80 | -13.00 ± 2.00 | +26.00 "
        "| 4.2 min | 24.0 | 1197 |" in text
    )
    assert (
        "| anil_rl | navigation_2d | -48.00 ± 4.00 | -18.00 ± 1.80 | -17.00 ± 2.00 | +30.00 "
        "| - | - | - |" in text
    )


def test_plot_is_written_and_empty_results_are_handled(metrics, tmp_path):
    path = plot_rl_adaptation(rl_results(metrics), tmp_path / "rl.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    empty = rl_results(tmp_path / "nothing")
    assert empty.empty
    assert "No RL evaluations" in rl_markdown(empty)
    assert plot_rl_adaptation(empty, tmp_path / "none.png").stat().st_size > 1000
