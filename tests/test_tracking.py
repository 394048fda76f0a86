"""MLflow tracking: a stage run's params, curves, tags and resource figures read back."""

import pytest
from mlflow import MlflowClient

from metalab.tracking import flatten, stage_run


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-inner-lr-1")
    return uri


def test_run_is_logged_with_figures_tags_and_curves(store):
    with stage_run("train@maml", {"train": {"meta_lr": 0.001, "clip": None}}, "unit") as run:
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
    with pytest.raises(RuntimeError), stage_run("prefetch", {}, "unit") as run:
        raise RuntimeError("boom")
    logged = MlflowClient(store).get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert "wall_time_s" in logged.data.metrics


def test_disabled_tracking_still_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    with stage_run("episodes", {}, enabled=False) as run:
        run.log_metrics({"x": 1.0})
        run.meter.add_tasks(5)
    assert run.run_id is None
    assert run.meter.figures()["tasks_per_s"] > 0
    assert not (tmp_path / "never.db").exists()


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}
