"""MLflow tracking: a stage run's params, curves, tags and resource figures read back; an
unusable store reported in one line; runs of killed stages closed on the next start."""

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omniglot_fixture import expected_counts

from metalab.algorithms.pretrain import pretrain_body
from metalab.errors import MetalabError
from metalab.models.config import ModelConfig
from metalab.schema import TrackingConfig
from metalab.tracking import (
    DATASET_DIGEST_CHARS,
    flatten,
    resolve_tracking_uri,
    run_name,
    run_tags,
    stage_run,
    tracking_uri,
)
from metalab.tracking_store import process_start, with_store_retries

UNIT = TrackingConfig(experiment_name="unit")
ROOT = Path(__file__).resolve().parents[1]


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
    assert tags["git_commit"] and tags["device"] == "cpu" and tags["device_name"]
    assert logged.data.params == {"train.meta_lr": "0.001", "train.clip": "null"}
    assert logged.info.run_name == run_name("train@maml", tags)
    assert logged.info.run_name.startswith("train@maml · sweep-inner-lr-1")
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


def test_run_names_say_stage_experiment_and_commit():
    commit = "859b862" + "0" * 33
    assert run_name("train@maml", {"git_commit": commit}) == "train@maml · 859b862"
    tags = {"git_commit": f"{commit}-dirty", "dvc_exp_name": "anil-lr-0.3"}
    assert run_name("train@anil", tags) == "train@anil · anil-lr-0.3 · 859b862-dirty"
    assert run_name("download", {"git_commit": "unknown"}) == "download"


def test_archives_are_dataset_inputs_by_digest_with_their_source(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    records = {
        "images_background": {
            "source": "https://example.org/omniglot/",
            "sha256": "5e40902b4b72" + "a" * 52,
            "size_bytes": 8556666,
            "drawings": 19280,
        },
        "images_evaluation": {
            "source": "../mirror",  # a local mirror, relative to the project root
            "sha256": "bcc0b44a73cc" + "b" * 52,
            "size_bytes": 5838819,
            "drawings": 13180,
        },
    }
    with stage_run("download", {}, UNIT) as run:
        run.log_archives(records, context="download")
    inputs = MlflowClient(store).get_run(run.run_id).inputs.dataset_inputs
    found = {entry.dataset.name: entry for entry in inputs}
    assert sorted(found) == ["omniglot/images_background", "omniglot/images_evaluation"]
    background = found["omniglot/images_background"]
    evaluation = found["omniglot/images_evaluation"]
    assert DATASET_DIGEST_CHARS <= 36  # MLflow's limit
    assert background.dataset.digest == "5e40902b4b72"
    assert background.dataset.source_type == "http"
    assert json.loads(background.dataset.source) == {
        "url": "https://example.org/omniglot/images_background.zip"
    }
    assert json.loads(background.dataset.profile) == {
        "sha256": records["images_background"]["sha256"],
        "size_bytes": 8556666,
        "drawings": 19280,
    }
    assert evaluation.dataset.source_type == "local"
    assert json.loads(evaluation.dataset.source) == {
        "uri": str(tmp_path / "mirror" / "images_evaluation.zip")
    }
    assert [(tag.key, tag.value) for tag in evaluation.tags] == [
        ("mlflow.data.context", "download")
    ]


def test_download_stage_logs_the_archives_it_fetched(store, tmp_path, tiny_omniglot_dir):
    counts = expected_counts()
    params = {
        "data": {
            "sources": [str(tiny_omniglot_dir)],
            "expected": {name: vars(count) for name, count in counts.items()},
            "split": {"validation_characters": 5},
        },
        "episodes": {"settings": ["5w1s"]},
        "tracking": {"experiment_name": "unit"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "download.py"), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    inputs = {entry.dataset.name: entry.dataset for entry in run.inputs.dataset_inputs}
    for name in counts:
        digest = hashlib.sha256((tmp_path / "data" / "raw" / f"{name}.zip").read_bytes())
        dataset = inputs[f"omniglot/{name}"]
        assert dataset.digest == digest.hexdigest()[:DATASET_DIGEST_CHARS]
        assert json.loads(dataset.profile)["sha256"] == digest.hexdigest()
        assert json.loads(dataset.source) == {"uri": str(tiny_omniglot_dir / f"{name}.zip")}


def test_pretraining_logs_its_curve_without_changing_weights(store):
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(48, 28, 28, generator=generator) * 255).to(torch.uint8)
    labels = torch.arange(4).repeat_interleave(12)
    settings = dict(epochs=3, batch_size=16, lr=0.01, seed=0, progress=False)
    plain = pretrain_body(ModelConfig(hidden=8), images, labels, **settings)
    with stage_run("pretrain", {}, UNIT) as run:
        logged = pretrain_body(
            ModelConfig(hidden=8), images, labels, **settings, on_log=run.log_metrics
        )
    assert plain.keys() == logged.keys()
    assert all(torch.equal(plain[key], logged[key]) for key in plain)
    client = MlflowClient(store)
    for key in ("loss", "accuracy", "epoch"):  # once per epoch, step = optimizer steps
        curve = client.get_metric_history(run.run_id, key)
        assert [point.step for point in curve] == [3, 6, 9], key
    assert all(0 <= p.value <= 1 for p in client.get_metric_history(run.run_id, "accuracy"))
    assert all(p.value > 0 for p in client.get_metric_history(run.run_id, "loss"))


def test_pretrain_stage_logs_its_curves(store, tmp_path, tiny_prefetched_28):
    (tmp_path / "data" / "prefetched").mkdir(parents=True)
    shutil.copy(tiny_prefetched_28, tmp_path / "data" / "prefetched" / "omniglot.npz")
    params = {
        "data": {"split": {"validation_characters": 5}},
        "pretrain": {"model": {"hidden": 8}, "epochs": 2, "batch_size": 64, "threads": 1},
        "tracking": {"experiment_name": "unit"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    # 15 meta-train characters x 18 drawings (2 held out): 5 batches per epoch, 4 curve rows
    for key in ("loss", "accuracy", "validation_loss", "validation_accuracy"):
        steps = [p.step for p in client.get_metric_history(run.info.run_id, key)]
        assert steps == [2, 3, 4, 5, 7, 8, 9, 10], key


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
    monkeypatch.setattr("metalab.tracking_store.time.sleep", lambda seconds: None)
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


# ---------------------------------------------------------------- an unusable store


def assert_one_line_naming(error: MetalabError, database) -> None:
    message = str(error)
    assert "\n" not in message and str(database) in message, message
    assert "tracking.enabled: false" in message


def truncated_store(path):
    """A real store (one run logged) cut to half its size, as by a full disk or a crash."""
    with stage_run("report", {}, UNIT) as run:
        run.log_metrics({"x": 1.0})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_corrupt_store_is_one_line_naming_the_file_and_the_fix(store, tmp_path, damage):
    database = tmp_path / "mlflow.db"
    if damage == "random bytes":
        database.write_bytes(os.urandom(20_000))
    else:
        truncated_store(database)
    with pytest.raises(MetalabError) as raised, stage_run("train@maml", {}, UNIT):
        pytest.fail("the stage ran on a corrupt store")
    assert_one_line_naming(raised.value, database)
    assert f"mv {database} {database}.broken" in str(raised.value)


def test_directory_in_place_of_the_store_is_one_line(store, tmp_path):
    """Fails for root too (unlike chmod)."""
    database = tmp_path / "mlflow.db"
    database.mkdir()
    with pytest.raises(MetalabError, match="is a directory") as raised:
        with stage_run("train@maml", {}, UNIT):
            pytest.fail("the stage ran without a store")
    assert_one_line_naming(raised.value, database)


@pytest.mark.parametrize("read_only", ["file", "directory"])
def test_unwritable_store_is_one_line(store, tmp_path, read_only):
    with stage_run("report", {}, UNIT):
        pass
    database = tmp_path / "mlflow.db"
    target = database if read_only == "file" else tmp_path
    mode = target.stat().st_mode
    target.chmod(0o444 if read_only == "file" else 0o555)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        with pytest.raises(MetalabError, match="cannot be written") as raised:
            with stage_run("train@maml", {}, UNIT):
                pytest.fail("the stage ran on a read-only store")
    finally:
        target.chmod(mode)
    assert_one_line_naming(raised.value, database)


def test_store_damaged_during_the_run_is_one_line_locks_still_retried(store, tmp_path):
    database = tmp_path / "mlflow.db"
    with stage_run("train@maml", {}, UNIT) as run:
        real_log_batch, calls = run.client.log_batch, []

        def log_batch(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            if len(calls) == 3:
                raise MlflowException("(sqlite3.DatabaseError) database disk image is malformed")
            return real_log_batch(*args, **kwargs)

        run.client.log_batch = log_batch
        run.log_metrics({"loss": 1.0}, step=1)  # locked once, then written
        with pytest.raises(MetalabError) as raised:
            run.log_metrics({"loss": 0.5}, step=2)
        run.client.log_batch = real_log_batch
    assert_one_line_naming(raised.value, database)
    assert "database disk image is malformed" in str(raised.value)
    history = MlflowClient(store).get_metric_history(run.run_id, "loss")
    assert [point.step for point in history] == [1]


def test_stage_prints_one_line_for_a_corrupt_store(tmp_path):
    """End to end: a stage script's stderr is one line and its exit status 1."""
    (tmp_path / "mlflow.db").write_bytes(b"not a database " * 1000)
    script = textwrap.dedent(
        """
        from metalab.cli import run_stage, stage_parser
        from metalab.schema import TrackingConfig
        from metalab.tracking import stage_run

        def main(args, params):
            with stage_run("report", {}, TrackingConfig()):
                print("ran")

        run_stage(main, stage_parser(None), lambda path: None)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["DVC_ROOT"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: MLflow store {tmp_path / 'mlflow.db'} ")


# ---------------------------------------------------------------- runs of killed stages

KILLED_STAGE = textwrap.dedent(
    """
    import os, signal, sys
    from metalab.schema import TrackingConfig
    from metalab.tracking import stage_run

    with stage_run("train@maml", {}, TrackingConfig(experiment_name="unit")) as run:
        run.log_metrics({"loss": 1.0}, step=1)
        print(run.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    """
)


def fake_run(client, stage, pid, host=None, started=None):
    """A RUNNING run as `stage_run` opens it, in process `pid` of `host`."""
    experiment = client.get_experiment_by_name("unit").experiment_id
    tags = run_tags(stage, None) | {"pid": str(pid), "host": host or socket.gethostname()}
    tags.pop("process_start", None)
    if started or process_start(pid):
        tags["process_start"] = started or process_start(pid)
    return client.create_run(experiment, tags=tags).info.run_id


def test_run_of_a_killed_stage_is_closed_as_killed_on_the_next_start(store):
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_STAGE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    dead_run = stdout.strip()
    client = MlflowClient(store)
    before = client.get_run(dead_run)
    assert before.info.status == "RUNNING" and before.info.end_time is None
    assert before.data.tags["pid"] == str(killed.pid)
    assert before.data.tags["host"] == socket.gethostname()
    with stage_run("train@maml", {}, UNIT) as run:
        after = client.get_run(dead_run)
        assert after.info.status == "KILLED"
        assert after.info.end_time >= before.info.start_time
        assert client.get_run(run.run_id).info.status == "RUNNING"  # its own run untouched
    assert after.data.metrics["loss"] == 1.0  # what it logged is kept


def test_live_foreign_and_other_stage_runs_are_left_running(store):
    with stage_run("report", {}, UNIT):  # creates the store and the experiment
        pass
    client = MlflowClient(store)
    live = subprocess.Popen(["sleep", "60"])  # another stage still running (a queue worker)
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        runs = {
            "live": fake_run(client, "train@maml", live.pid),
            "other host": fake_run(client, "train@maml", gone.pid, host="elsewhere.example"),
            "other stage": fake_run(client, "train@anil", gone.pid),
            "dead": fake_run(client, "train@maml", gone.pid),
            "pid reused": fake_run(client, "train@maml", live.pid, started="0-0-0:1"),
        }
        with stage_run("train@maml", {}, UNIT):
            pass
        status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    finally:
        live.kill()
        live.wait()
    assert status == {
        "live": "RUNNING",
        "other host": "RUNNING",
        "other stage": "RUNNING",
        "dead": "KILLED",
        "pid reused": "KILLED",
    }


# ---------------------------------------------------------------- resumed training


def test_resumed_training_continues_its_step_numbers(store):
    """Trainer and train_rl log step = iteration, restored from the checkpoint; the run of
    the resumed stage records those steps as given (here: killed after step 2)."""
    with pytest.raises(KeyboardInterrupt), stage_run("train@maml", {}, UNIT) as first:
        for step in range(3):
            first.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        raise KeyboardInterrupt
    with stage_run("train@maml", {}, UNIT) as resumed:
        for step in (3, 4):
            resumed.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    client = MlflowClient(store)
    assert [p.step for p in client.get_metric_history(first.run_id, "loss")] == [0, 1, 2]
    curve = client.get_metric_history(resumed.run_id, "loss")
    assert [(p.step, p.value) for p in curve] == [(3, 0.25), (4, 0.2)]
