"""Held-out evaluation: accuracy on the fixed meta-test episode sets, with 95% intervals.

Every learner is evaluated on the same stored tasks (`data/episodes/<setting>.npz`), so
per-episode accuracies of two learners can be compared pairwise. Intervals are the normal
approximation ``mean +- 1.96 * s / sqrt(n)`` with the sample standard deviation ``s``
(ddof=1, the usual estimate from a sample; at n = 600 it differs from ddof=0 by 0.08%).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from metalab.algorithms.base import MetaLearner
from metalab.data.episodes import (
    EpisodeIndex,
    Episodes,
    load_episode_set,
    materialize,
    setting_seed,
)
from metalab.learner_api import Learner, UnsupportedTaskError
from metalab.params import Params, ParamsError, parse_setting
from metalab.tracking import flatten

Z_95 = 1.96
# Tasks materialised at a time: 600 tasks of 20-way 5-shot would need ~750 MB at once.
TASK_CHUNK = 50
EPISODE_COLUMNS = ["setting", "episode", "accuracy_before", "accuracy_after", "seconds"]


# ------------------------------------------------------------------------- statistics
def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96 * std(ddof=1) / sqrt(n)`` of values [n].

    The half-width is NaN for fewer than two values (no spread to estimate).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan
    return mean, float(Z_95 * values.std(ddof=1) / math.sqrt(values.size))


@dataclass(frozen=True)
class PairedDifference:
    """Mean and 95% half-width of the per-episode differences ``a - b`` over n episodes."""

    mean: float
    ci95: float
    episodes: int

    @property
    def significant(self) -> bool:
        """True when the 95% interval excludes zero."""
        return math.isfinite(self.ci95) and abs(self.mean) > self.ci95


def paired_difference(a: np.ndarray, b: np.ndarray) -> PairedDifference:
    """Paired comparison of two learners' accuracies a, b [n] on the same n episodes."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired accuracies need equal 1-D shapes, got {a.shape} and {b.shape}")
    mean, ci95 = mean_ci95(a - b)
    return PairedDifference(mean, ci95, int(a.size))


# ------------------------------------------------------------------------- accuracy
def query_accuracy(logits: torch.Tensor, query_y: torch.Tensor) -> float:
    """Fraction of queries classified correctly: logits [Q, N], query_y int64 [Q]."""
    return float((logits.argmax(dim=-1) == query_y).float().mean())


def evaluate_accuracy(
    learner: MetaLearner, episodes: Episodes, steps: int | None = None
) -> torch.Tensor:
    """Per-task accuracy after `learner.adapt` on each task's support set: float [T]."""
    accuracies = []
    for task in range(episodes.num_tasks):
        predictor = learner.adapt(episodes.support_x[task], episodes.support_y[task], steps)
        with torch.no_grad():
            logits = predictor(episodes.query_x[task])
        accuracies.append((logits.argmax(-1) == episodes.query_y[task]).float().mean())
    return torch.stack(accuracies)


def episode_set_fingerprint(index: EpisodeIndex) -> str:
    """Short hash of which images (and rotations) make up an episode set: two evaluations
    with the same fingerprint ran on the same tasks, so they can be paired."""
    digest = hashlib.sha256()
    for tensor in (index.image_index, index.rotation):
        digest.update(np.ascontiguousarray(tensor.numpy().astype(np.int64)).tobytes())
    digest.update(str(index.k_shot).encode())
    return digest.hexdigest()[:16]


@dataclass
class SettingEvaluation:
    """One learner on one episode set.

    accuracy_after, seconds: float64 [T]; accuracy_before: float64 [T] or None when the
    learner has no meaningful "before adaptation" (no gradient steps at test time).
    ``unsupported`` holds the reason when the learner cannot do this setting at all.
    """

    setting: str
    n_way: int
    k_shot: int
    episode_set: str
    adaptation_steps: int | None
    accuracy_after: np.ndarray
    accuracy_before: np.ndarray | None
    seconds: np.ndarray
    unsupported: str | None = None

    def summary(self) -> dict[str, Any]:
        """Scalars for metrics/eval/<name>.json (accuracies as fractions)."""
        after, after_ci = mean_ci95(self.accuracy_after)
        summary: dict[str, Any] = {
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "episodes": int(self.accuracy_after.size),
            "adaptation_steps": self.adaptation_steps,
            "accuracy": after,
            "ci95": after_ci,
            "accuracy_before": None,
            "ci95_before": None,
            "gain": None,
            "gain_ci95": None,
            "seconds_per_episode": float(self.seconds.mean()) if self.seconds.size else None,
            "episode_set": self.episode_set,
        }
        if self.accuracy_before is not None:
            before, before_ci = mean_ci95(self.accuracy_before)
            gain = paired_difference(self.accuracy_after, self.accuracy_before)
            summary.update(
                accuracy_before=before,
                ci95_before=before_ci,
                gain=gain.mean,
                gain_ci95=gain.ci95,
            )
        return {key: json_number(value) for key, value in summary.items()}

    def episode_rows(self) -> pd.DataFrame:
        """One row per episode (columns `EPISODE_COLUMNS`; accuracy_before NaN if none)."""
        count = self.accuracy_after.size
        before = (
            self.accuracy_before if self.accuracy_before is not None else np.full(count, np.nan)
        )
        return pd.DataFrame(
            {
                "setting": [self.setting] * count,
                "episode": np.arange(count),
                "accuracy_before": before,
                "accuracy_after": self.accuracy_after,
                "seconds": self.seconds,
            },
            columns=EPISODE_COLUMNS,
        )


def json_number(value: Any) -> Any:
    """NaN/inf -> None, so the JSON stays standard (dvc and browsers reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_episode_set(
    learner: Learner,
    images: torch.Tensor,
    index: EpisodeIndex,
    setting: str,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "",
) -> SettingEvaluation:
    """Adapt `learner` to every task of `index` and score its queries.

    images: uint8 [N_images, S, S] (the prefetched array the index points into). `steps`
    overrides the learner's test-time adaptation steps (None = its default). Before
    adaptation (``steps=0``) is also scored when `learner.adapts_by_gradient`. The global
    torch RNG is seeded from (`seed`, `setting`) first, so a rerun gives the same numbers.
    Seconds per episode time the adaptation and prediction that give accuracy_after.
    Returns a `SettingEvaluation`; if the learner cannot handle the task shape (its
    `UnsupportedTaskError` on the first task), an empty one with the reason.
    """
    torch.manual_seed(setting_seed(seed, setting))
    num_tasks = index.num_tasks
    after = np.zeros(num_tasks)
    before = np.zeros(num_tasks) if learner.adapts_by_gradient else None
    seconds = np.zeros(num_tasks)
    used_steps = steps if steps is not None else learner.default_adaptation_steps
    result = SettingEvaluation(
        setting=setting,
        n_way=index.n_way,
        k_shot=index.k_shot,
        episode_set=episode_set_fingerprint(index),
        adaptation_steps=used_steps if learner.adapts_by_gradient else None,
        accuracy_after=after,
        accuracy_before=before,
        seconds=seconds,
    )
    bar = tqdm(total=num_tasks, desc=description or setting, disable=not progress, leave=True)
    try:
        for start in range(0, num_tasks, TASK_CHUNK):
            episodes = materialize(images, index[start : start + TASK_CHUNK])
            for offset in range(episodes.num_tasks):
                task = start + offset
                support_x = episodes.support_x[offset]
                support_y = episodes.support_y[offset]
                query_x, query_y = episodes.query_x[offset], episodes.query_y[offset]
                try:
                    started = time.perf_counter()
                    logits = learner.adapt(support_x, support_y, steps).predict(query_x)
                    seconds[task] = time.perf_counter() - started
                    if before is not None:
                        unadapted = learner.adapt(support_x, support_y, 0).predict(query_x)
                        before[task] = query_accuracy(unadapted, query_y)
                except UnsupportedTaskError as error:
                    if task > 0:
                        raise
                    return _unsupported(result, str(error))
                after[task] = query_accuracy(logits, query_y)
                bar.update(1)
                bar.set_postfix(acc=f"{after[: task + 1].mean():.4f}")
    finally:
        bar.close()
    return result


def _unsupported(result: SettingEvaluation, reason: str) -> SettingEvaluation:
    empty = np.zeros(0)
    result.accuracy_after = empty
    result.accuracy_before = None
    result.seconds = empty
    result.unsupported = reason
    return result


@dataclass
class LearnerEvaluation:
    """All settings of one learner; `metrics()` is the metrics/eval/<name>.json content."""

    experiment: str
    algorithm: str
    settings: dict[str, SettingEvaluation]

    def metrics(self, **extra: Any) -> dict[str, Any]:
        """Scalar JSON: identity, per-setting summaries, unsupported settings, `extra`."""
        supported = {s: e for s, e in self.settings.items() if e.unsupported is None}
        unsupported = {s: e.unsupported for s, e in self.settings.items() if e.unsupported}
        return {
            "experiment": self.experiment,
            "algorithm": self.algorithm,
            "settings": {setting: e.summary() for setting, e in supported.items()},
            "unsupported": unsupported,
            "evaluation_seconds": float(sum(e.seconds.sum() for e in supported.values())),
            "episodes": int(sum(e.accuracy_after.size for e in supported.values())),
            **{key: json_number(value) for key, value in extra.items()},
        }

    def episode_table(self) -> pd.DataFrame:
        """Per-episode accuracies of every supported setting (columns `EPISODE_COLUMNS`)."""
        frames = [e.episode_rows() for e in self.settings.values() if e.unsupported is None]
        if not frames:
            return pd.DataFrame(columns=EPISODE_COLUMNS)
        return pd.concat(frames, ignore_index=True)


def evaluate_learner(
    learner: Learner,
    images: torch.Tensor,
    episode_sets: dict[str, EpisodeIndex],
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    experiment: str | None = None,
) -> LearnerEvaluation:
    """Evaluate `learner` on each {setting: episode index} (see `evaluate_episode_set`).

    images: uint8 [N_images, S, S] with S = the learner's image size. `experiment` names
    the result (default: the name stored in the model file).
    """
    size = int(images.shape[-1])
    if size != learner.image_size:
        raise ValueError(
            f"the model was trained on {learner.image_size}px images but the prefetched "
            f"images are {size}px; evaluate with the same data.image_size it was trained with"
        )
    experiment = experiment or learner.experiment
    results = {}
    for setting, index in episode_sets.items():
        results[setting] = evaluate_episode_set(
            learner,
            images,
            index,
            setting,
            steps=steps,
            seed=seed,
            progress=progress,
            description=f"evaluate {experiment} {setting}",
        )
    return LearnerEvaluation(experiment, learner.algorithm, results)


def evaluation_settings(params: Params) -> list[str]:
    """`evaluate.settings`, or all of `episodes.settings` when null; ParamsError if a
    listed setting has no episode set."""
    settings = params.evaluate.settings
    if settings is None:
        return list(params.episodes.settings)
    missing = [s for s in settings if s not in params.episodes.settings]
    if missing:
        raise ParamsError(
            f"params.yaml: evaluate.settings = {missing}: not in episodes.settings "
            f"{params.episodes.settings} (only those episode sets exist)"
        )
    return list(settings)


def load_episode_sets(
    settings: list[str], directory: str | Path, max_episodes: int | None = None
) -> dict[str, EpisodeIndex]:
    """{setting: stored episode index} from `directory`/<setting>.npz, checking that each
    file holds the N-way K-shot tasks its name promises. With `max_episodes`, only the
    first that many tasks of each set (the same ones for every learner)."""
    sets = {}
    for setting in settings:
        index, metadata = load_episode_set(Path(directory) / f"{setting}.npz")
        n_way, k_shot = parse_setting(setting)
        if (index.n_way, index.k_shot) != (n_way, k_shot) or metadata.get("setting", setting) != (
            setting
        ):
            raise ValueError(
                f"{directory}/{setting}.npz holds {index.n_way}-way {index.k_shot}-shot tasks "
                f"(setting {metadata.get('setting')!r}); rerun `dvc repro episodes`"
            )
        sets[setting] = index if max_episodes is None else index[:max_episodes]
    return sets


def train_run_id(train_metrics_path: str | Path) -> str | None:
    """The MLflow run id the train stage recorded in metrics/train/<name>.json, if any."""
    path = Path(train_metrics_path)
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("mlflow_run_id")


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics mapping, flattened to 'a.b' keys (for MLflow)."""
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
