"""The RL stages end to end in a scratch project: train_rl writes the model, metrics and
curves, a rerun after an interruption resumes, evaluate_rl writes returns with CIs."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
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
