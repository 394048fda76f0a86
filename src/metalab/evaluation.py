"""Held-out evaluation: accuracy on the fixed meta-test episode sets, with 95% intervals.

Every learner is evaluated on the same stored tasks (`data/episodes/<setting>.npz`), so
per-episode accuracies of two learners can be compared pairwise (`metalab.statistics`
computes the intervals and paired differences).

With ``evaluate.step_selection`` a gradient learner tested off its training setting takes the
step count best on validation tasks of that setting (validation characters only; `choose_steps`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from metalab.algorithms.base import MetaLearner
from metalab.data.config import parse_setting
from metalab.data.episodes import (
    EpisodeIndex,
    Episodes,
    load_episode_set,
    materialize,
    sample_episode_index,
    setting_seed,
)
from metalab.layout import episode_set_file
from metalab.learner_api import Learner, UnsupportedTaskError
from metalab.records import EvaluationMetrics, MetricsFile, SettingResult, TrainRunReference
from metalab.records.vision import StepSelectionResult
from metalab.statistics import mean_ci95, paired_difference
from metalab.tracking import flatten

# Tasks materialised at a time: 600 tasks of 20-way 5-shot would need ~750 MB at once.
TASK_CHUNK = 50
# Support + query images per `Learner.adapt_many` call of a learner that batches tasks:
# 5 episodes of 20-way 5-shot with 15 queries per class (400 images each), 25 of 5-way
# 1-shot. Activation memory is bounded inside the learner (it runs its own chunks of a
# few tasks); this bounds what a call keeps for all its tasks (images, adapted weights,
# features, logits) and how long the progress bar waits between updates.
CHUNK_IMAGES = 2000
EPISODE_COLUMNS = ["setting", "episode", "accuracy_before", "accuracy_after", "seconds"]


# ------------------------------------------------------------------------- accuracy
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
    step_choice: StepChoice | None = None

    def summary(self) -> SettingResult:
        """This setting's entry of metrics/eval/<name>.json (accuracies as fractions; the
        schema stores NaN, e.g. the interval of a single episode, as null)."""
        after, after_ci = mean_ci95(self.accuracy_after)
        before = before_ci = gain = gain_ci = None
        if self.accuracy_before is not None:
            before, before_ci = mean_ci95(self.accuracy_before)
            difference = paired_difference(self.accuracy_after, self.accuracy_before)
            gain, gain_ci = difference.mean, difference.ci95
        return SettingResult(
            n_way=self.n_way,
            k_shot=self.k_shot,
            episodes=int(self.accuracy_after.size),
            adaptation_steps=self.adaptation_steps,
            accuracy=after,
            ci95=after_ci,
            accuracy_before=before,
            ci95_before=before_ci,
            gain=gain,
            gain_ci95=gain_ci,
            seconds_per_episode=float(self.seconds.mean()) if self.seconds.size else None,
            episode_set=self.episode_set,
            **(self.step_choice.record_fields() if self.step_choice is not None else {}),
        )

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


def evaluate_episode_set(
    learner: Learner,
    images: torch.Tensor,
    index: EpisodeIndex,
    setting: str,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "",
    batch_tasks: bool = True,
) -> SettingEvaluation:
    """Adapt `learner` to every task of `index` and score its queries.

    images: uint8 [N_images, S, S] (the prefetched array the index points into). `steps`
    overrides the learner's test-time adaptation steps (None = its default). Before
    adaptation (``steps=0``) is also scored when `learner.adapts_by_gradient`. The global
    torch RNG is seeded from (`seed`, `setting`) first, so a rerun gives the same numbers.

    A learner that batches tasks (`Learner.batches_tasks`) gets the episodes in chunks of
    up to `CHUNK_IMAGES` support + query images (`Learner.adapt_many`; the episodes of a
    set share one shape); the others, and any learner with ``batch_tasks=False``, get one
    episode at a time (`Learner.adapt`), in the order of a per-episode loop (random numbers
    included: batching learners draw none at test time). Seconds per episode time all of
    an episode's adaptation and prediction, before adaptation included (a batching gradient
    learner computes both in one call, `score_chunk`); a chunk's time is divided evenly
    among its episodes. Returns a `SettingEvaluation`; if the learner cannot handle the
    task shape (its `UnsupportedTaskError` on the first chunk), an empty one with the reason.
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
    batched = batch_tasks and learner.batches_tasks
    per_call = episodes_per_call(index) if batched else 1
    bar = tqdm(total=num_tasks, desc=description or setting, disable=not progress, leave=True)
    try:
        for start in range(0, num_tasks, TASK_CHUNK):
            episodes = materialize(images, index[start : start + TASK_CHUNK])
            for offset in range(0, episodes.num_tasks, per_call):
                chunk = episodes[offset : offset + per_call]
                tasks = slice(start + offset, start + offset + chunk.num_tasks)
                try:
                    started = time.perf_counter()
                    unadapted, logits = score_chunk(learner, chunk, steps, batched)
                    seconds[tasks] = (time.perf_counter() - started) / chunk.num_tasks
                    if before is not None:
                        before[tasks] = task_accuracies(unadapted, chunk.query_y)
                except UnsupportedTaskError as error:
                    if tasks.start > 0:
                        raise
                    return _unsupported(result, str(error))
                after[tasks] = task_accuracies(logits, chunk.query_y)
                bar.update(chunk.num_tasks)
                bar.set_postfix(acc=f"{after[: tasks.stop].mean():.4f}")
    finally:
        bar.close()
    return result


def episodes_per_call(index: EpisodeIndex) -> int:
    """Episodes of `index` per `Learner.adapt_many` call: as many as fit in `CHUNK_IMAGES`
    support + query images, at least one, at most `TASK_CHUNK`."""
    images = index.n_way * (index.k_shot + index.query_per_class)
    return max(1, min(TASK_CHUNK, CHUNK_IMAGES // images))


def score_chunk(
    learner: Learner, episodes: Episodes, steps: int | None, batched: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Query logits [T, Q, N] of the T tasks of `episodes` before adaptation (None unless
    `learner.adapts_by_gradient`) and after it, with `steps`. Batched, a gradient learner
    gives both from one call (`Learner.adapt_before_after`, sharing what they have in
    common); one episode at a time, after adaptation comes first, then before (``steps=0``),
    the order of random numbers the per-episode loop has always drawn."""
    if batched and learner.adapts_by_gradient:
        adapted = learner.adapt_before_after(episodes.support_x, episodes.support_y, steps)
        return adapted.predict(episodes.query_x)
    logits = adapt_and_predict(learner, episodes, steps, batched)
    if not learner.adapts_by_gradient:
        return None, logits
    return adapt_and_predict(learner, episodes, 0, batched), logits


def adapt_and_predict(
    learner: Learner, episodes: Episodes, steps: int | None, batched: bool
) -> torch.Tensor:
    """Query logits [T, Q, N] of `learner` adapted with `steps` to each of the T tasks of
    `episodes`: all at once (`Learner.adapt_many`) when `batched`, else (T = 1) the one
    task through `Learner.adapt`."""
    if batched:
        adapted = learner.adapt_many(episodes.support_x, episodes.support_y, steps)
        return adapted.predict(episodes.query_x)
    if episodes.num_tasks != 1:
        raise ValueError(f"one episode at a time, got {episodes.num_tasks}")
    adapted = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps)
    return adapted.predict(episodes.query_x[0]).unsqueeze(0)


def task_accuracies(logits: torch.Tensor, query_y: torch.Tensor) -> np.ndarray:
    """Per-task fraction of queries classified correctly: logits [T, Q, N], query_y int64
    [T, Q] -> float64 [T] (each task's float32 mean, as a per-episode loop computes it)."""
    correct = (logits.argmax(dim=-1) == query_y).float()
    return np.array([float(row.mean()) for row in correct])


def _unsupported(result: SettingEvaluation, reason: str) -> SettingEvaluation:
    empty = np.zeros(0)
    result.accuracy_after = empty
    result.accuracy_before = None
    result.seconds = empty
    result.unsupported = reason
    return result


# ------------------------------------------------------------ test-time step selection
@dataclass(frozen=True)
class StepSelection:
    """``evaluate.step_selection`` with its tasks: {setting: validation episode index}
    (`validation_episode_sets`), the candidate step counts and the seed."""

    validation_sets: dict[str, EpisodeIndex]
    candidates: tuple[int, ...]
    seed: int = 0


@dataclass
class StepChoice:
    """The test-time steps of one setting: kept on the `trained_setting` (no candidate
    scored), else the best of `accuracies` ({steps: mean validation accuracy}, in the order
    tried) on `episodes` validation tasks (fingerprint `episode_set`)."""

    steps: int
    trained_setting: bool
    accuracies: dict[int, float]
    episodes: int = 0
    episode_set: str | None = None

    def record_fields(self) -> dict[str, Any]:
        """The `SettingResult` fields of the choice: numbers, and a note (text)."""
        tried = ", ".join(map(str, self.accuracies))
        note = (
            f"trained setting: kept the trained {self.steps} steps"
            if self.trained_setting
            else f"{self.steps} steps: best mean accuracy of steps [{tried}] on {self.episodes} "
            f"validation episodes (set {self.episode_set})"
        )
        accuracies = {str(steps): value for steps, value in self.accuracies.items()}
        result = StepSelectionResult(
            trained_setting=self.trained_setting,
            episodes=self.episodes,
            validation_accuracy=accuracies,
        )
        return {"step_selection": result, "step_selection_note": note}


def validation_episode_sets(
    validation_classes: torch.Tensor,
    drawings_per_character: int,
    test_sets: dict[str, EpisodeIndex],
    episodes: int,
    seed: int,
) -> dict[str, EpisodeIndex]:
    """{setting: `episodes` tasks shaped as its test tasks in `test_sets` (N, K, Q), drawn
    from `validation_classes`} (int64 [C, 2]: character, rotation; the split's validation
    part, so no meta-test character appears); seeded by (`seed`, setting), as test sets."""
    return {
        setting: sample_episode_index(
            validation_classes,
            drawings_per_character,
            *(shape.n_way, shape.k_shot, shape.query_per_class, episodes),
            torch.Generator().manual_seed(setting_seed(seed, setting)),
        )
        for setting, shape in test_sets.items()
    }


def select_adaptation_steps(
    learner: Learner,
    images: torch.Tensor,
    index: EpisodeIndex,
    setting: str,
    candidates: tuple[int, ...] | list[int],
    seed: int = 0,
) -> StepChoice | None:
    """The candidate step count with the best mean query accuracy on the validation tasks
    `index` of `setting` (ties: the fewest steps, the cheaper), scored as the test tasks
    are (`evaluate_episode_set`: batched, RNG seeded from (`seed`, `setting`) per candidate,
    so no candidate depends on another). None if the learner cannot do the tasks."""
    accuracies: dict[int, float] = {}
    for steps in dict.fromkeys(candidates):
        scored = evaluate_episode_set(learner, images, index, setting, steps, seed, False)
        if scored.unsupported is not None:
            return None  # the test set reports why
        accuracies[steps] = float(scored.accuracy_after.mean())
    best = max(accuracies, key=lambda steps: (accuracies[steps], -steps))
    fingerprint = episode_set_fingerprint(index)
    return StepChoice(best, False, accuracies, index.num_tasks, fingerprint)


def choose_steps(
    learner: Learner,
    images: torch.Tensor,
    index: EpisodeIndex,
    setting: str,
    selection: StepSelection | None,
) -> StepChoice | None:
    """The steps of test set `index` under `selection`: None without one or for a learner
    without test-time gradient steps; kept on the setting the learner was trained on (N-way
    K-shot; an unknown K matches none); else `select_adaptation_steps`, the learner's own
    test-time steps tried too (after the grid), so the choice does at least as well on
    validation as no selection."""
    if selection is None or not learner.adapts_by_gradient:
        return None
    own = learner.default_adaptation_steps
    if (index.n_way, index.k_shot) == (learner.n_way, learner.k_shot):
        return StepChoice(int(own or 0), True, {})
    candidates = (*selection.candidates, *([own] if own is not None else []))
    validation = selection.validation_sets[setting]
    return select_adaptation_steps(learner, images, validation, setting, candidates, selection.seed)


@dataclass
class LearnerEvaluation:
    """All settings of one learner; `record()` is the metrics/eval/<name>.json content."""

    experiment: str
    algorithm: str
    settings: dict[str, SettingEvaluation]

    def record(
        self,
        train_run_id: str | None = None,
        mlflow_run_id: str | None = None,
        **figures: Any,
    ) -> EvaluationMetrics:
        """Identity, per-setting summaries, unsupported settings, the MLflow runs of the
        training and of this evaluation, and the stage's `figures` (fields of
        `EvaluationMetrics`: peak memory, see `metalab.tracking.memory_figures`, and where
        it ran, `metalab.device.device_record`)."""
        supported = {s: e for s, e in self.settings.items() if e.unsupported is None}
        return EvaluationMetrics(
            experiment=self.experiment,
            algorithm=self.algorithm,
            settings={setting: e.summary() for setting, e in supported.items()},
            unsupported={s: e.unsupported for s, e in self.settings.items() if e.unsupported},
            evaluation_seconds=float(sum(e.seconds.sum() for e in supported.values())),
            episodes=int(sum(e.accuracy_after.size for e in supported.values())),
            **figures,
            train_run_id=train_run_id,
            mlflow_run_id=mlflow_run_id,
        )

    def metrics(self, **figures: Any) -> dict[str, Any]:
        """`record(**figures)` as plain JSON data (keys in file order)."""
        return self.record(**figures).to_dict()

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
    step_selection: StepSelection | None = None,
) -> LearnerEvaluation:
    """Evaluate `learner` on each {setting: episode index} (see `evaluate_episode_set`).

    images: uint8 [N_images, S, S] with S = the learner's image size. `experiment` names
    the result (default: the name stored in the model file). With `step_selection` (and
    `steps` None), a gradient learner's test-time steps on each setting come from
    `choose_steps` (recorded with the setting's result); the test tasks are scored after
    the selection, with the RNG reseeded, so they see nothing of it.
    """
    if step_selection is not None and steps is not None:
        raise ValueError("give either fixed steps or a step selection, not both")
    size = int(images.shape[-1])
    if size != learner.image_size:
        raise ValueError(
            f"the model was trained on {learner.image_size}px images but the prefetched "
            f"images are {size}px; evaluate with the same data.image_size it was trained with"
        )
    experiment = experiment or learner.experiment
    results = {}
    for setting, index in episode_sets.items():
        choice = choose_steps(learner, images, index, setting, step_selection)
        results[setting] = evaluate_episode_set(
            learner,
            images,
            index,
            setting,
            # the trained setting keeps the learner's default (steps None), as without it
            steps=choice.steps if choice is not None and not choice.trained_setting else steps,
            seed=seed,
            progress=progress,
            description=f"evaluate {experiment} {setting}",
        )
        if results[setting].unsupported is None:
            results[setting].step_choice = choice
    return LearnerEvaluation(experiment, learner.algorithm, results)


def load_episode_sets(
    settings: list[str], directory: str | Path, max_episodes: int | None = None
) -> dict[str, EpisodeIndex]:
    """{setting: stored episode index} from `directory`/<setting>.npz, checking that each
    file holds the N-way K-shot tasks its name promises. With `max_episodes`, only the
    first that many tasks of each set (the same ones for every learner)."""
    sets = {}
    for setting in settings:
        index, metadata = load_episode_set(episode_set_file(setting, directory))
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
    """The MLflow run id the train stage recorded with metrics/train/<name>.json (in its
    info file), None without that file (`MetricsFileError` if either file is unreadable)."""
    path = Path(train_metrics_path)
    if not path.is_file():
        return None
    return TrainRunReference.read(path).mlflow_run_id


def numeric_metrics(metrics: MetricsFile | dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record or mapping, flattened to 'a.b' keys (for MLflow)."""
    if isinstance(metrics, MetricsFile):
        metrics = metrics.to_dict()
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
