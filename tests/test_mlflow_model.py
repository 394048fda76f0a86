"""The trained learner as an MLflow model: logged on a run of a temporary store, loaded back
with ``mlflow.pyfunc.load_model("runs:/<id>/model")``, it predicts exactly what the learner
API predicts; it carries its signature and input example, pickles no project object and
is logged without touching the network. The train stage, run for real, logs it with its
dataset inputs, its effective params once and a readable run name."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import importlib_metadata
import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model
from test_learner_api import trainer_like_payload
from test_training import tiny_params

from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.io import save_torch
from metalab.learner_api import load_learner
from metalab.mlflow_model import (
    INPUT_COLUMNS,
    OUTPUT_COLUMNS,
    example_task,
    log_learner_model,
    task_frame,
)
from metalab.params import TrainConfig
from metalab.records import DataMetrics
from metalab.schema import TrackingConfig
from metalab.tracking import stage_run

ROOT = Path(__file__).resolve().parents[1]
UNIT = TrackingConfig(experiment_name="unit")


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def trained(tiny_prefetched_28, tmp_path_factory):
    """A tiny protonets learner trained for 6 iterations on the tiny archives: (model file,
    arrays, split)."""
    from metalab.training import Trainer

    directory = tmp_path_factory.mktemp("trained")
    arrays = load_prefetched(tiny_prefetched_28)
    params = tiny_params()
    split = make_split(arrays.character_origin, params.data.split)
    trainer = Trainer("proto", params, arrays, split, directory / "checkpoints", progress=False)
    trainer.run()
    trainer.save_model(directory / "proto.pt")
    return directory / "proto.pt", arrays, split


def input_example(uri: str):
    """The input example stored with the MLflow model at `uri`."""
    local = mlflow.artifacts.download_artifacts(uri)
    return Model.load(local).load_input_example(local)


def no_network(monkeypatch):
    """Any connection to a non-local address fails the test."""
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise AssertionError(f"MLflow model logging tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def test_logged_model_predicts_what_the_learner_api_predicts(store, trained, monkeypatch):
    model_file, arrays, split = trained
    example = example_task(arrays, split.validation, n_way=3, k_shot=1)
    scans = []
    with monkeypatch.context() as guarded:
        no_network(guarded)
        # MLflow's environment check indexes every installed distribution (seconds); it
        # swallows errors, so count the calls.
        guarded.setattr(importlib_metadata, "packages_distributions", lambda: scans.append(1))
        with stage_run("train@proto", {"train": {"n_way": 3}}, UNIT) as run:
            model_id = log_learner_model(
                run, model_file, example, metrics={"best_validation_accuracy": 0.75}
            )
    assert model_id is not None and scans == []

    # Another task than the input example: the meta-test classes, 2 shots, 3 queries each.
    classes = split.meta_test[3:6]
    drawings = arrays.drawings_per_character
    images = torch.stack(
        [arrays.images[c * drawings : c * drawings + 5] for c in classes[:, 0].tolist()]
    )
    images = images.float().div(255.0).unsqueeze(2)  # [3 classes, 5, 1, S, S]
    support_x, query_x = images[:, :2].flatten(0, 1), images[:, 2:].flatten(0, 1)
    support_y = torch.arange(3).repeat_interleave(2)

    model = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model")
    output = model.predict(task_frame(support_x, support_y, query_x))
    expected = load_learner(model_file, device="cpu").adapt(support_x, support_y).predict(query_x)
    assert list(output.columns) == list(OUTPUT_COLUMNS) and len(output) == 1
    logits = np.asarray(output["logits"][0], dtype=np.float32)
    np.testing.assert_array_equal(logits, expected.numpy())
    assert output["predicted_labels"][0] == expected.argmax(dim=1).tolist()

    # Its signature, input example and metadata; linked to its run, with its metrics.
    signature = model.metadata.signature
    assert signature is not None
    assert signature.inputs.input_names() == list(INPUT_COLUMNS)
    assert signature.outputs.input_names() == list(OUTPUT_COLUMNS)
    assert [spec.name for spec in signature.params] == ["steps"]
    assert model.metadata.metadata["metalab_algorithm"] == "protonets"
    shown = input_example(f"runs:/{run.run_id}/model")
    assert shown is not None and list(shown.columns) == list(INPUT_COLUMNS)
    assert len(shown["support_images"][0]) == 3 and len(shown["query_images"][0]) == 3
    client = MlflowClient(store)
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.run_id and logged.name == "model"
    assert logged.status == LoggedModelStatus.READY
    assert logged.params["train.n_way"] == "3"
    assert {m.key: m.value for m in logged.metrics} == {"best_validation_accuracy": 0.75}
    outputs = client.get_run(run.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model_id]

    # Models from code: the model file and a script, no pickled object; pinned requirements.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not any(name.endswith((".pkl", ".pickle", ".cloudpickle")) for name in files)
    assert "artifacts/proto.pt" in files and "metalab_learner.py" in files
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert any(line.startswith("metalab==") for line in requirements)


def test_inputs_as_dicts_inference_steps_and_one_line_errors(store, tmp_path):
    """A gradient learner: ``steps`` reaches `Learner.adapt`; a dict, a list of dicts and a
    DataFrame of two tasks are all accepted; a wrong image size names task and column."""
    payload, _ = trainer_like_payload("maml")
    save_torch(tmp_path / "maml.pt", payload)
    generator = torch.Generator().manual_seed(3)
    support_x = torch.rand(5, 1, 28, 28, generator=generator)
    support_y = torch.arange(5)
    query_x = torch.rand(4, 1, 28, 28, generator=generator)
    with stage_run("train@maml", {}, UNIT) as run:
        log_learner_model(run, tmp_path / "maml.pt", (support_x, support_y, query_x))
    model = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model", model_config={"device": "cpu"})
    learner = load_learner(tmp_path / "maml.pt", device="cpu")

    frame = task_frame(support_x, support_y, query_x)
    task = frame.iloc[0].to_dict()
    for steps in (None, 0):
        expected = learner.adapt(support_x, support_y, steps).predict(query_x).numpy()
        params = None if steps is None else {"steps": steps}
        for given in (task, [task, task]):
            output = model.predict(given, params=params)
            for row in range(len(output)):
                logits = np.asarray(output["logits"][row], dtype=np.float32)
                np.testing.assert_array_equal(logits, expected)
    before = learner.adapt(support_x, support_y, 0).predict(query_x)
    after = learner.adapt(support_x, support_y).predict(query_x)
    assert not torch.equal(before, after)  # so the check above tells the two apart

    small = dict(task, query_images=torch.rand(2, 16 * 16).double().tolist())
    with pytest.raises(Exception) as raised:
        model.predict([task, small])
    message = str(raised.value)
    assert "task 1: query_images" in message and "28x28 = 784" in message


def test_nothing_is_logged_without_tracking(tmp_path, monkeypatch, trained):
    model_file, arrays, split = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    example = example_task(arrays, split.validation, n_way=3, k_shot=1)
    with stage_run("train@proto", {}, UNIT, enabled=False) as run:
        assert log_learner_model(run, model_file, example) is None
    assert not (tmp_path / "never.db").exists()


def test_example_task_is_real_drawings_with_their_rotation(trained):
    _, arrays, _ = trained
    classes = torch.tensor([[4, 0], [7, 1], [9, 2]])
    support_x, support_y, query_x = example_task(arrays, classes, n_way=3, k_shot=2)
    assert support_x.shape == (6, 1, 28, 28) and query_x.shape == (3, 1, 28, 28)
    assert support_y.tolist() == [0, 0, 1, 1, 2, 2]
    drawings = arrays.drawings_per_character
    turned = torch.rot90(arrays.images[7 * drawings + 1].float() / 255, 1, dims=(-2, -1))
    assert torch.equal(support_x[3, 0], turned)
    assert torch.equal(query_x[0, 0], arrays.images[4 * drawings + 2].float() / 255)


# --------------------------------------------------------------- the train stage for real
@pytest.mark.slow
def test_train_stage_logs_model_datasets_effective_params_and_a_readable_name(
    tmp_path, tiny_prefetched_28
):
    project = tmp_path / "project"
    (project / "data" / "prefetched").mkdir(parents=True)
    shutil.copy(tiny_prefetched_28, project / "data" / "prefetched" / "omniglot.npz")
    shutil.copytree(ROOT / "src" / "metalab" / "models", project / "src" / "metalab" / "models")
    sha = {"images_background": "ab" * 32, "images_evaluation": "cd" * 32}
    (project / "metrics").mkdir()
    DataMetrics.model_validate(
        {
            name: {
                "source": "https://example.org/omniglot/",
                "sha256": digest,
                "size_bytes": 1000,
                "alphabets": 4,
                "characters": 20,
                "drawings": 400,
            }
            for name, digest in sha.items()
        }
    ).write(project / "metrics" / "data.json")  # and data.info.json
    params = {
        "data": {"split": {"validation_characters": 5}},
        "train": tiny_params().train.model_dump() | {"iterations": 2, "validate_every": 2},
        "experiments": {
            "tiny": {
                "algorithm": "protonets",
                "body_init": "src/metalab/models",
                "model": {"hidden": 8},
                # an override: logged once, as the effective train.meta_lr
                "train": {"meta_lr": 0.002},
            }
        },
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), "tiny", "--no-progress"],
        cwd=project,
        capture_output=True,
        text=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("metalab").experiment_id])
    assert run.info.run_name.startswith("train@tiny")  # then " · <commit>" inside git
    params_logged = run.data.params
    assert params_logged["train.meta_lr"] == "0.002"
    assert not any(key.startswith("experiment.train") for key in params_logged)
    logged_train = {key.removeprefix("train.") for key in params_logged if key.startswith("train.")}
    assert logged_train == set(TrainConfig.model_fields)  # every effective value, once
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["omniglot/images_background", "omniglot/images_evaluation"]
    background = inputs["omniglot/images_background"]
    assert background.dataset.digest == sha["images_background"][:12]
    assert json.loads(background.dataset.source) == {
        "url": "https://example.org/omniglot/images_background.zip"
    }
    assert json.loads(background.dataset.profile)["sha256"] == sha["images_background"]
    assert {tag.key: tag.value for tag in background.tags} == {"mlflow.data.context": "training"}

    mlflow.set_tracking_uri(uri)  # as stage_run does: runs:/ URIs resolve in this store
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    example = input_example(f"runs:/{run.info.run_id}/model")
    output = model.predict(example)
    learner = load_learner(project / "models" / "tiny.pt", device="cpu")
    support_x = torch.tensor(example["support_images"][0], dtype=torch.float32).view(-1, 1, 28, 28)
    query_x = torch.tensor(example["query_images"][0], dtype=torch.float32).view(-1, 1, 28, 28)
    support_y = [int(label) for label in example["support_labels"][0]]
    expected = learner.adapt(support_x, support_y).predict(query_x)
    np.testing.assert_array_equal(
        np.asarray(output["logits"][0], dtype=np.float32), expected.numpy()
    )
