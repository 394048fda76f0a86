"""The RL stages end to end in a scratch project: train_rl writes the model, metrics and
curves, a rerun after an interruption resumes, evaluate_rl writes returns with CIs."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(stage: str, name: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), name, "--no-progress", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_train_and_evaluate_rl_stages(tmp_path):
    tiny = dict(
        algorithm="anil_rl",
        iterations=4,
        meta_batch_size=3,
        trajectories_per_task=4,
        horizon=10,
        hidden_size=8,
        eval_tasks=4,
        seed=3,
    )
    params = {"tracking": {"enabled": False}, "rl_experiments": {"nav": tiny}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    trained = run("train_rl", "nav", tmp_path, "--checkpoint-every", "2")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "models" / "rl" / "nav.pt").exists()
    summary = json.loads((tmp_path / "metrics" / "train_rl" / "nav.json").read_text())
    assert summary["iterations"] == 4 and summary["tasks_per_s"] > 0
    info = json.loads((tmp_path / "metrics" / "train_rl" / "nav.info.json").read_text())
    assert info["experiment"] == "nav" and "experiment" not in summary
    curve = pd.read_csv(tmp_path / "plots" / "train_rl" / "nav.csv")
    assert list(curve["iteration"]) == [0, 1, 2, 3]
    assert {"policy_loss", "critic_loss", "total_loss", "pre_adaptation_return"} <= set(curve)

    # The checkpoint of the finished run resumes at its last iteration: nothing to redo.
    rerun = run("train_rl", "nav", tmp_path, "--checkpoint-every", "2")
    assert rerun.returncode == 0 and "resuming nav from iteration 4" in rerun.stdout

    evaluated = run("evaluate_rl", "nav", tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((tmp_path / "metrics" / "eval_rl" / "nav.json").read_text())
    assert result["num_tasks"] == 4
    assert set(result) >= {"before_adaptation", "after_1_steps", "after_2_steps", "after_3_steps"}
    assert result["after_1_steps"]["ci95"] >= 0
    assert result["trained_steps"] == 1 and result["trajectories_per_task"] == 40
    info = json.loads((tmp_path / "metrics" / "eval_rl" / "nav.info.json").read_text())
    assert info["eval_step_schedule"] == "halve_after_first"
    oracle, random_init = result["reference_oracle"], result["reference_random_init"]
    # The goal-aware oracle beats the untrained policy on the same tasks, at every step.
    for key in ("before_adaptation", "after_1_steps", "after_3_steps"):
        assert oracle[key]["mean_return"] > random_init[key]["mean_return"]
    assert oracle["before_adaptation"] == oracle["after_3_steps"]


def test_unknown_rl_experiment_is_a_params_error(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"rl_experiments": {}}))
    result = run("train_rl", "missing", tmp_path)
    assert result.returncode == 2
    assert "no RL experiment named 'missing'" in result.stderr


def test_seed_stages_write_one_run_each_and_the_report_aggregates_them(tmp_path):
    from metalab.report.rl import rl_results

    tiny = dict(
        algorithm="maml_rl",
        iterations=2,
        meta_batch_size=2,
        trajectories_per_task=3,
        horizon=6,
        hidden_size=4,
        eval_tasks=3,
        eval_trajectories_per_task=3,
        eval_adaptation_steps=[1],
    )
    params = {"tracking": {"enabled": False}, "rl_experiments": {"nav": tiny}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for seed in ("0", "1"):
        for stage in ("train_rl", "evaluate_rl"):
            done = run(stage, "nav", tmp_path, "--seed", seed)
            assert done.returncode == 0, done.stderr
    for seed in (0, 1):
        assert (tmp_path / "models" / "rl" / f"nav-s{seed}.pt").is_file()
        assert (tmp_path / "plots" / "train_rl" / f"nav-s{seed}.csv").is_file()
        trained = json.loads((tmp_path / "metrics" / "train_rl" / f"nav-s{seed}.json").read_text())
        evaluated = json.loads((tmp_path / "metrics" / "eval_rl" / f"nav-s{seed}.json").read_text())
        assert trained["seed"] == evaluated["seed"] == seed
    first, second = (
        json.loads((tmp_path / "metrics" / "eval_rl" / f"nav-s{seed}.json").read_text())
        for seed in (0, 1)
    )
    # Different training seeds, the same held-out tasks: the oracle's returns agree.
    assert first["reference_oracle"] == second["reference_oracle"]
    assert first["after_1_steps"] != second["after_1_steps"]

    results = rl_results(tmp_path / "metrics")
    learner = results[results["policy"] == "meta_learned"].set_index("steps")
    assert set(learner["seeds"]) == {2}
    means = [first["after_1_steps"]["mean_return"], second["after_1_steps"]["mean_return"]]
    assert learner.loc[1, "mean_return"] == pytest.approx(sum(means) / 2)
    assert (learner.loc[1, "seed_min"], learner.loc[1, "seed_max"]) == (min(means), max(means))
    assert len(results[results["policy"] == "oracle"]) == 2  # once, not once per seed


def test_a_seed_set_in_params_and_on_the_command_line_is_refused(tmp_path):
    params = {"tracking": {"enabled": False}, "rl_experiments": {"nav": {"seed": 4}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run("train_rl", "nav", tmp_path, "--seed", "1")
    assert result.returncode == 1
    assert "rl_experiments.nav.seed = 4" in result.stderr
    assert not (tmp_path / "models").exists()
