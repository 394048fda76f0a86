"""A trained learner as an MLflow model: the train stage logs ``models/<name>.pt`` on its run.

The model (MLflow's ``python_function`` flavour, "models from code": no project object is
pickled) holds the model file as its artifact and a three-line script that loads it with
`metalab.load_learner` (``weights_only``, see `metalab.learner_api`), so it serves exactly
what ``load_learner(path).adapt(support_x, support_y).predict(query_x)`` computes::

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    frame = task_frame(support_x, support_y, query_x)     # one row per task
    out = model.predict(frame)          # columns predicted_labels, logits; one row per task

Input, one row per task (`INPUT_COLUMNS`, checked against the signature by MLflow):

  support_images   the N*K support images, each a flat row-major list of S*S floats in
                   [0, 1] (ink = 1.0, what `Learner.transform` gives, flattened)
  support_labels   the N*K labels, ints 0..N-1 with every class present
  query_images     the Q query images, like support_images

Output, one row per task: ``predicted_labels`` (Q ints) and ``logits`` (Q lists of N
floats). The inference parameter ``steps`` overrides the test-time adaptation steps
(``predict(frame, params={"steps": 0})``). ``model_config={"device": "cpu"}`` at load picks
the device (default: ``METALAB_DEVICE``). The serving environment needs metalab installed
(``mlflow models serve --env-manager local`` from the project's environment).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from unittest.mock import patch

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from metalab.data.prefetch import OmniglotArrays
from metalab.learner_api import load_learner, read_model_payload
from metalab.tracking import StageRun

MODEL_NAME = "model"
"""The model's name on its run: it loads as ``runs:/<run id>/model``."""
MODEL_FILE_ARTIFACT = "model_file"
INPUT_COLUMNS = ("support_images", "support_labels", "query_images")
OUTPUT_COLUMNS = ("predicted_labels", "logits")
REQUIREMENTS = ("metalab", "torch", "mlflow")

# The model's code, copied into the logged model and run when it loads (models from code).
MODEL_CODE = '''"""metalab's trained learner as an MLflow pyfunc model: see metalab.mlflow_model."""

import mlflow

from metalab.mlflow_model import LearnerModel

mlflow.models.set_model(LearnerModel())
'''


def signature() -> ModelSignature:
    """Inputs `INPUT_COLUMNS`, outputs `OUTPUT_COLUMNS` (arrays of any length), and the
    optional inference parameter ``steps``."""
    images = Array(Array("double"))
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(images, "support_images"),
                ColSpec(Array("long"), "support_labels"),
                ColSpec(images, "query_images"),
            ]
        ),
        outputs=Schema(
            [ColSpec(Array("long"), "predicted_labels"), ColSpec(Array(Array("double")), "logits")]
        ),
        params=ParamSchema([ParamSpec("steps", "long", None)]),
    )


def task_frame(
    support_x: torch.Tensor, support_y: torch.Tensor | Sequence[int], query_x: torch.Tensor
) -> pd.DataFrame:
    """One task in the model's input format: support_x float [N*K, 1, S, S], support_y
    [N*K], query_x float [Q, 1, S, S] (as for `Learner.adapt` and ``predict``)."""
    return pd.DataFrame(
        [
            {
                "support_images": support_x.detach().cpu().flatten(1).double().tolist(),
                "support_labels": [int(label) for label in support_y],
                "query_images": query_x.detach().cpu().flatten(1).double().tolist(),
            }
        ]
    )


def _images(value: Any, column: str, size: int) -> torch.Tensor:
    """A cell of `column` (images, each flattening to S*S floats) -> float32 [B, 1, S, S]."""
    try:
        flat = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) for image in value])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{column}: expected a list of images of {size}x{size} floats ({error})"
        ) from error
    if flat.shape[1] != size * size:
        raise ValueError(
            f"{column}: each image must have {size}x{size} = {size * size} values (flattened "
            f"row by row), got {flat.shape[1]}"
        )
    return torch.from_numpy(flat).view(-1, 1, size, size)


def _labels(value: Any) -> torch.Tensor:
    labels = np.asarray(value)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"support_labels: expected a list of ints, got {labels.dtype} values")
    return torch.from_numpy(labels.astype(np.int64))


class LearnerModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model around a model file; see the module docstring for its input."""

    def load_context(self, context: Any) -> None:
        device = (context.model_config or {}).get("device")
        self.learner = load_learner(context.artifacts[MODEL_FILE_ARTIFACT], device=device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        # model_input is a DataFrame under the signature; a task dict or a list of them
        # is accepted when this is called directly.
        if isinstance(model_input, Mapping):
            model_input = pd.DataFrame([dict(model_input)])
        elif not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(list(model_input))
        missing = [column for column in INPUT_COLUMNS if column not in model_input.columns]
        if missing:
            raise ValueError(f"missing input column(s) {missing}; expected {list(INPUT_COLUMNS)}")
        steps = (params or {}).get("steps")
        size = self.learner.image_size
        rows = []
        for task, row in enumerate(model_input.itertuples(index=False)):
            try:
                support_x = _images(row.support_images, "support_images", size)
                query_x = _images(row.query_images, "query_images", size)
                adapted = self.learner.adapt(support_x, _labels(row.support_labels), steps)
                logits = adapted.predict(query_x)
            except ValueError as error:
                raise ValueError(f"task {task}: {error}") from error
            rows.append(
                {
                    "predicted_labels": logits.argmax(dim=1).tolist(),
                    "logits": logits.double().tolist(),
                }
            )
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def example_task(
    arrays: OmniglotArrays, classes: torch.Tensor, n_way: int, k_shot: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small real task for the model's input example: the first `n_way` of `classes`
    (int64 [C, 2] rows of (character, quarter turns), e.g. the split's validation classes),
    `k_shot` drawings of each as support and the next one as query. Returns support_x
    float [N*K, 1, S, S], support_y int64 [N*K], query_x float [N, 1, S, S]."""
    drawings = arrays.drawings_per_character
    n_way, k_shot = min(n_way, classes.shape[0]), min(k_shot, drawings - 1)
    support, query = [], []
    for character, turns in classes[:n_way].tolist():
        first = character * drawings
        images = arrays.images[first : first + k_shot + 1].unsqueeze(1).float().div(255.0)
        images = torch.rot90(images, turns, dims=(-2, -1))
        support.append(images[:k_shot])
        query.append(images[k_shot:])
    labels = torch.arange(n_way).repeat_interleave(k_shot)
    return torch.cat(support), labels, torch.cat(query)


def pip_requirements() -> list[str]:
    """The installed versions of `REQUIREMENTS` (local version labels such as ``+cu130``
    dropped), so that MLflow infers nothing and needs no network."""
    requirements = []
    for package in REQUIREMENTS:
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


@contextmanager
def _quick_offline_save() -> Iterator[None]:
    """Around ``save_model``: skip MLflow's check that this environment satisfies the
    model's requirements (they are this environment's versions, `pip_requirements`; the
    check indexes every installed distribution's files, seconds on a slow file system) and
    its progress bar for copying the model file into the model."""
    from mlflow.utils import environment

    with ExitStack() as stack:
        stack.enter_context(patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "0"}))
        if hasattr(environment, "warn_dependency_requirement_mismatches"):
            stack.enter_context(
                patch.object(environment, "warn_dependency_requirement_mismatches", lambda _: None)
            )
        yield


def log_learner_model(
    run: StageRun,
    model_path: str | Path,
    example: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    metrics: Mapping[str, float] | None = None,
) -> str | None:
    """Log the model file `model_path` (``models/<name>.pt``) on `run` as the MLflow model
    `MODEL_NAME`, with `example` (support_x, support_y, query_x, e.g. `example_task`) as
    its input example and `metrics` linked to it; returns the model's id, None with
    tracking disabled."""
    if run.run_id is None:
        return None
    model_path = Path(model_path)
    payload = read_model_payload(model_path)
    described = ("experiment", "algorithm", "n_way", "k_shot", "image_size", "format")
    metadata = {f"metalab_{key}": payload.get(key) for key in described}

    def save(path: Path, mlflow_model: Model) -> None:
        with tempfile.TemporaryDirectory(prefix="metalab-model-code-") as directory:
            code = Path(directory) / "metalab_learner.py"
            code.write_text(MODEL_CODE)
            with _quick_offline_save():
                mlflow.pyfunc.save_model(
                    path,
                    python_model=str(code),
                    artifacts={MODEL_FILE_ARTIFACT: str(model_path)},
                    signature=signature(),
                    input_example=task_frame(*example),
                    pip_requirements=pip_requirements(),
                    metadata=metadata,
                    mlflow_model=mlflow_model,
                )

    tags = {"metalab_experiment": payload["experiment"], "metalab_algorithm": payload["algorithm"]}
    return run.log_model(save, MODEL_NAME, metrics=metrics, tags=tags)
