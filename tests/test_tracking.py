"""MLflow tracking: a stage run's params, curves, tags and resource figures read back."""

import sqlite3

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from metalab.schema import TrackingConfig
from metalab.tracking import (
    flatten,
    resolve_tracking_uri,
    stage_run,
    tracking_uri,
    with_store_retries,
)

UNIT = TrackingConfig(experiment_name="unit")


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-inner-lr-1")
    return uri


def test_run_is_logged_with_figures_tags_and_curves(store):
    with stage_run("train@maml", {"train": {"meta_lr": 0.001, "clip": None}}, UNIT) as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.meter.add_tasks(64, seconds=2.0)
    client = MlflowClient(store)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    metrics = logged.data.metrics
    assert metrics["tasks_per_s"] == pytest.approx(32.0)
    assert metrics["wall_time_s"] > 0 and metrics["peak_memory_mb"] > 10
    tags = logged.data.tags
    assert tags["dvc_stage"] == "train@maml"
    assert tags["dvc_exp_name"] == "sweep-inner-lr-1"
    assert tags["git_commit"] and tags["device"]
    assert logged.data.params == {"train.meta_lr": "0.001", "train.clip": "null"}
    curve = client.get_metric_history(run.run_id, "loss")
    assert [point.step for point in curve] == [0, 1, 2]
    assert curve[-1].value == pytest.approx(1 / 3)


def test_failed_stage_is_marked_failed_and_keeps_figures(store):
    with pytest.raises(RuntimeError), stage_run("prefetch", {}, UNIT) as run:
        raise RuntimeError("boom")
    logged = MlflowClient(store).get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert "wall_time_s" in logged.data.metrics


def test_disabled_tracking_still_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    with stage_run("episodes", {}, UNIT, enabled=False) as run:
        run.log_metrics({"x": 1.0})
        run.meter.add_tasks(5)
    assert run.run_id is None
    assert run.meter.figures()["tasks_per_s"] > 0
    assert not (tmp_path / "never.db").exists()


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_relative_sqlite_store_resolves_against_the_project_root(tmp_path):
    root = tmp_path / "project"
    assert resolve_tracking_uri("sqlite:///mlflow.db", root) == f"sqlite:///{root}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/m.db?mode=rw", root) == (
        f"sqlite:///{root}/runs/m.db?mode=rw"
    )
    for unchanged in ("sqlite:////abs/mlflow.db", "sqlite://", "http://127.0.0.1:5000"):
        assert resolve_tracking_uri(unchanged, root) == unchanged


def test_queued_experiment_logs_to_dvc_root_not_its_workspace(tmp_path, monkeypatch):
    project, workspace = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmp123"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking_uri() == f"sqlite:///{project}/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    assert tracking_uri() == f"sqlite:///{workspace}/mlflow.db"


def test_store_is_in_wal_mode_and_artifacts_live_next_to_it(store, tmp_path):
    with stage_run("report", {}, UNIT):
        pass
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    experiment = MlflowClient(store).get_experiment_by_name("unit")
    assert experiment.artifact_location == str(tmp_path / "mlruns" / experiment.experiment_id)


def test_locked_database_is_retried_other_errors_are_not(monkeypatch):
    monkeypatch.setattr("metalab.tracking.time.sleep", lambda seconds: None)
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "logged"

    def missing_run() -> None:
        attempts.append(1)
        raise MlflowException("Run 'abc' not found")

    assert with_store_retries(flaky, "test") == "logged" and len(attempts) == 3
    with pytest.raises(MlflowException, match="not found"):
        with_store_retries(missing_run, "test")
    assert len(attempts) == 4  # not retried
