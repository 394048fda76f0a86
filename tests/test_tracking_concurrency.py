"""Two queue workers at once against one fresh SQLite MLflow store lose no run, metric or tag.

Each worker is a separate OS process (as with ``dvc queue start -j 2``) that, like a queued
DVC experiment, runs in its own throwaway workspace with ``DVC_ROOT`` pointing at the
project and the default relative store URI; the run must land in the project's store. A
real ``dvc exp run --temp`` (the executor queue workers use) checks the same end to end.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from mlflow import MlflowClient

from metalab.schema import TrackingConfig
from metalab.tracking import stage_run

STEPS = 50
WORKERS = ("sweep-lr-0.1", "sweep-lr-0.3")
BARRIER_TIMEOUT_S = 120  # generous: a spawned worker imports torch and mlflow first


def log_experiment(
    exp_name: str, project: str, workspace: str, barrier: Barrier, steps: int
) -> None:
    """One worker: a tiny training run logged with metalab.tracking.

    The first barrier makes both workers open the fresh store and create the experiment at
    the same moment; the second makes their metric writes overlap.
    """
    os.chdir(workspace)  # a temporary workspace, as under .dvc/tmp/exps/
    os.environ.update(
        MLFLOW_TRACKING_URI="sqlite:///mlflow.db",  # relative, as by default
        DVC_ROOT=project,
        DVC_EXP_NAME=exp_name,
        DVC_EXP_BASELINE_REV="0123abcd",
    )
    barrier.wait(BARRIER_TIMEOUT_S)
    with stage_run(
        "train@anil_s1",
        {"options": {"inner_lr": exp_name}},
        TrackingConfig(),
        tags={"experiment": "anil_s1"},
    ) as run:
        barrier.wait(BARRIER_TIMEOUT_S)
        for step in range(steps):
            run.log_metrics({"loss": 1.0 / (step + 1), "accuracy": step / steps}, step=step)
            if step == steps // 2:
                run.set_tags({"halfway": "yes"})
        run.meter.add_tasks(steps * 4, seconds=1.0)


def test_two_workers_at_once_lose_no_run_metric_or_tag(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    workspaces = {name: tmp_path / "exps" / name for name in WORKERS}
    # spawn, not fork: fresh interpreters like real queue workers, no inherited MLflow state.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(WORKERS))
    processes = []
    for name, workspace in workspaces.items():
        workspace.mkdir(parents=True)
        process = context.Process(
            target=log_experiment,
            args=(name, str(project), str(workspace), barrier, STEPS),
            name=name,
        )
        process.start()
        processes.append(process)
    for process in processes:
        process.join(timeout=240)
        if process.is_alive():
            process.kill()
            pytest.fail(f"worker {process.name} hung")
    assert [process.exitcode for process in processes] == [0, 0], "a worker crashed (see stderr)"

    # Everything in the project's store, nothing in the temporary workspaces.
    assert (project / "mlflow.db").exists()
    assert not any((workspace / "mlflow.db").exists() for workspace in workspaces.values())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = client.search_experiments()
    assert sorted(experiment.name for experiment in experiments) == ["Default", "metalab"]
    experiment = client.get_experiment_by_name("metalab")
    assert experiment.artifact_location == str(project / "mlruns" / experiment.experiment_id)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["dvc_exp_name"] for run in runs) == sorted(WORKERS)
    for run in runs:
        name = run.data.tags["dvc_exp_name"]
        assert run.info.status == "FINISHED", name
        assert run.info.run_name == f"train@anil_s1 · {name}"  # stage · DVC experiment (no git)
        tags = run.data.tags
        assert tags["dvc_stage"] == "train@anil_s1" and tags["dvc_exp_baseline_rev"] == "0123abcd"
        assert tags["git_commit"] and tags["halfway"] == "yes" and tags["experiment"] == "anil_s1"
        assert run.data.params == {"options.inner_lr": name}
        for key in ("loss", "accuracy"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(point.step for point in history) == list(range(STEPS)), (name, key)
        assert run.data.metrics["loss"] == pytest.approx(1.0 / STEPS)
        assert {"wall_time_s", "tasks_per_s", "peak_memory_mb"} <= set(run.data.metrics)


STAGE_SCRIPT = """\
import json, yaml
from metalab.schema import TrackingConfig
from metalab.tracking import stage_run

params = yaml.safe_load(open("params.yaml"))
with stage_run("probe", params, TrackingConfig()) as run:
    run.log_metrics({"score": params["inner_lr"] * 10})
json.dump({"score": params["inner_lr"] * 10}, open("score.json", "w"))
"""

DVC_YAML = """\
stages:
  probe:
    cmd: python probe.py
    deps: [probe.py]
    params: [inner_lr]
    metrics:
      - score.json:
          cache: false
"""


def run_checked(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_experiment_in_temporary_workspace_logs_to_project_store(tmp_path: Path) -> None:
    """`dvc exp run --temp` runs the stage in .dvc/tmp/exps/... (as queue workers do): with
    the default relative store URI the run still lands in the project's mlflow.db."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "probe.py").write_text(STAGE_SCRIPT)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("inner_lr: 0.5\n")
    (repo / ".gitignore").write_text("mlflow.db*\nmlruns/\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DVC_")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default, relative sqlite:///mlflow.db
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    run_checked(["git", "init", "-q"], repo, env)
    run_checked([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "baseline"], repo, env)
    baseline = run_checked(["git", "rev-parse", "HEAD"], repo, env).strip()

    run_checked(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "inner_lr=0.3", "-n", "lr-0.3"],
        repo,
        env,
    )

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("metalab")
    assert experiment.artifact_location == str(repo / "mlruns" / experiment.experiment_id)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"inner_lr": "0.3"}
    assert run.data.metrics["score"] == pytest.approx(3.0)
    tags = run.data.tags
    assert tags["dvc_exp_name"] == "lr-0.3" and tags["dvc_stage"] == "probe"
    assert tags["dvc_exp_baseline_rev"] == baseline
    # The temporary workspace is the baseline with the swept params applied.
    assert tags["git_commit"] in (baseline, f"{baseline}-dirty")
