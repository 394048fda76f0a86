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


def test_references_are_rows_of_their_own_and_steps_beyond_training_are_marked(metrics):
    returns = {
        "before_adaptation": {"mean_return": -5.0, "ci95": 0.1, "std": 0.3},
        "after_1_steps": {"mean_return": -5.0, "ci95": 0.1, "std": 0.3},
        "after_3_steps": {"mean_return": -5.0, "ci95": 0.1, "std": 0.3},
    }
    random_init = {key: {**value, "mean_return": -60.0} for key, value in returns.items()}
    for name in ("maml_rl", "anil_rl"):  # the same oracle twice: one row
        path = metrics / "eval_rl" / f"{name}.json"
        numbers = json.loads(path.read_text())
        numbers.update(trained_steps=1, reference_oracle=returns)
        if name == "maml_rl":
            numbers["reference_random_init"] = random_init
        path.write_text(json.dumps(numbers))

    results = rl_results(metrics)
    assert sorted(results["policy"].unique()) == ["meta_learned", "oracle", "random_init"]
    assert len(results[results["policy"] == "oracle"]) == 3
    # Learners first, references after; the reference rows carry no training cost.
    assert list(results["policy"])[:6] == ["meta_learned"] * 6
    assert results[results["policy"] != "meta_learned"]["training_seconds"].isna().all()
    maml = results[(results["experiment"] == "maml_rl") & (results["policy"] == "meta_learned")]
    assert list(maml["beyond_training"]) == [False, False, True]
    assert not results[results["policy"] == "random_init"]["beyond_training"].any()

    text = rl_markdown(results)
    assert "| maml_rl | navigation_2d | -40.00 ± 4.00 | -14.00 ± 1.80 | -13.00 ± 2.00* |" in text
    assert "| reference: oracle | navigation_2d | -5.00 ± 0.10 |" in text
    assert "| reference: random init (maml_rl) | navigation_2d | -60.00 ± 0.10 |" in text
    assert "* more adaptation steps than" in text
    assert plot_rl_adaptation(results, metrics / "rl.png").stat().st_size > 10_000
