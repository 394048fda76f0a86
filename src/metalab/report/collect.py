"""Read what the train and evaluate stages wrote, tolerating gaps.

Metrics files are read through their schemas (`metalab.records`). A missing file becomes
``None``; an unreadable or invalid one becomes ``None`` plus a note, so the report still
renders with "-" where a number is unknown.

An experiment's extra training seeds (files <experiment>-s<seed>, params.yaml `seed_runs`)
are not rows of their own: they are read into their experiment's `ExperimentRecord.seed_runs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd

from metalab.records import (
    EvaluationMetrics,
    MetricsFile,
    MetricsFileError,
    SettingResult,
    TrainSummary,
    is_info_file,
)

EPISODES_SUFFIX = ".episodes.csv"
#: A file name of an extra training seed: <experiment>-s<seed> (`metalab.params.run_name`).
SEED_RUN = re.compile(r"^(?P<experiment>.+)-s(?P<seed>\d+)$")
Record = TypeVar("Record", bound=MetricsFile)


@dataclass
class ExperimentRecord:
    """Everything known about one experiment (any part may be missing).

    train: metrics/train/<name>.json (with its .info.json); evaluation:
    metrics/eval/<name>.json (likewise); curve: plots/train/<name>.csv (iteration, loss,
    ...); episodes: metrics/eval/<name>.episodes.csv (setting, episode, accuracy_before,
    accuracy_after, seconds).
    """

    name: str
    configured_algorithm: str | None = None  # from params.yaml, when the files are missing
    train: TrainSummary | None = None
    evaluation: EvaluationMetrics | None = None
    curve: pd.DataFrame | None = None
    episodes: pd.DataFrame | None = None
    seed_runs: list[ExperimentRecord] = field(default_factory=list)  # its extra seeds
    file_seed: int | None = None  # the seed in an extra run's file name

    @property
    def runs(self) -> list[ExperimentRecord]:
        """Every training run of the experiment: its own, then its extra seeds."""
        return [self, *self.seed_runs]

    @property
    def seed(self) -> int | None:
        """The run's training seed as recorded (train summary, evaluation, file name);
        None for an own run written before seeds were recorded."""
        for source in (self.train, self.evaluation):
            if source is not None and source.seed is not None:
                return source.seed
        return self.file_seed

    @property
    def algorithm(self) -> str | None:
        for source in (self.train, self.evaluation):
            if source is not None and source.algorithm:
                return source.algorithm
        return self.configured_algorithm

    @property
    def unsupported(self) -> dict[str, str]:
        """{setting: why it was not evaluated} (empty without an evaluation)."""
        return self.evaluation.unsupported if self.evaluation is not None else {}

    def setting(self, setting: str) -> SettingResult | None:
        """The evaluation result of `setting`, or None when it was not evaluated."""
        if self.evaluation is None:
            return None
        return self.evaluation.settings.get(setting)

    def episode_accuracies(self, setting: str) -> pd.Series | None:
        """accuracy_after per episode of `setting`, indexed by episode, or None."""
        if self.episodes is None:
            return None
        rows = self.episodes[self.episodes["setting"] == setting]
        if rows.empty:
            return None
        return rows.set_index("episode")["accuracy_after"].sort_index()


@dataclass
class ReportInputs:
    experiments: dict[str, ExperimentRecord]
    settings: list[str]
    notes: list[str] = field(default_factory=list)


def read_record(schema: type[Record], path: Path, notes: list[str] | None) -> Record | None:
    """`schema.read(path)`; None if there is no such file. A file that cannot be read as
    `schema` raises `MetricsFileError` (one line naming the file), or with `notes` adds
    that line to them and gives None."""
    if not path.is_file():
        return None
    try:
        return schema.read(path)
    except MetricsFileError as error:
        if notes is None:
            raise
        notes.append(f"{error} (ignored)")
        return None


def _read_csv(path: Path, required: set[str], notes: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        notes.append(f"{path}: unreadable, ignored ({error})")
        return None
    missing = required - set(frame.columns)
    if missing:
        notes.append(f"{path}: missing columns {sorted(missing)}, ignored")
        return None
    return frame


def _names_in(directory: Path, suffix: str) -> list[str]:
    """The experiments with a `suffix` file in `directory` (not counting the per-episode
    tables and the info files beside the metrics files)."""
    if not directory.is_dir():
        return []
    return sorted(
        path.name.removesuffix(suffix)
        for path in directory.iterdir()
        if path.name.endswith(suffix)
        and not path.name.endswith(EPISODES_SUFFIX)
        and not is_info_file(path)
    )


def _seed_run_names(names: list[str], configured: list[str]) -> dict[str, tuple[str, int]]:
    """{run name: (experiment, seed)} of the names that are an extra seed of another name
    (<experiment>-s<seed>; a configured experiment is never one)."""
    runs = {}
    for name in names:
        match = SEED_RUN.match(name)
        if name not in configured and match and match["experiment"] in names:
            runs[name] = (match["experiment"], int(match["seed"]))
    return runs


def _read_run(name: str, metrics_dir: Path, plots_dir: Path, notes: list[str]) -> ExperimentRecord:
    """One run's files (any may be missing: a note says so)."""
    record = ExperimentRecord(
        name=name,
        train=read_record(TrainSummary, metrics_dir / "train" / f"{name}.json", notes),
        evaluation=read_record(EvaluationMetrics, metrics_dir / "eval" / f"{name}.json", notes),
        curve=_read_csv(plots_dir / "train" / f"{name}.csv", {"iteration", "loss"}, notes),
        episodes=_read_csv(
            metrics_dir / "eval" / f"{name}{EPISODES_SUFFIX}",
            {"setting", "episode", "accuracy_after"},
            notes,
        ),
    )
    if record.train is None:
        notes.append(f"{name}: no training metrics (metrics/train/{name}.json)")
    if record.evaluation is None:
        notes.append(f"{name}: no evaluation metrics (metrics/eval/{name}.json)")
    for setting, reason in record.unsupported.items():
        notes.append(f"{name}: {setting} not evaluated: {reason}")
    return record


def collect_inputs(
    metrics_dir: str | Path,
    plots_dir: str | Path,
    experiments: dict[str, str] | list[str] | None = None,
    settings: list[str] | None = None,
) -> ReportInputs:
    """Gather every experiment's files under `metrics_dir` (train/, eval/) and
    `plots_dir` (train/).

    `experiments` (params.yaml order; a {name: algorithm} mapping or just names) are
    always listed, even without any file; others found on disk follow in name order.
    `settings` likewise come first, then any other setting found in an evaluation file.
    """
    configured = experiments if isinstance(experiments, dict) else {}
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    notes: list[str] = []
    names = list(experiments or [])
    for found in (
        _names_in(metrics_dir / "train", ".json")
        + _names_in(metrics_dir / "eval", ".json")
        + _names_in(plots_dir / "train", ".csv")
    ):
        if found not in names:
            names.append(found)
    seed_runs = _seed_run_names(names, list(experiments or []))
    records = {}
    for name in names:
        if name in seed_runs:
            continue
        record = _read_run(name, metrics_dir, plots_dir, notes)
        record.configured_algorithm = configured.get(name)
        records[name] = record
    for name, (experiment, seed) in seed_runs.items():
        run = _read_run(name, metrics_dir, plots_dir, notes)
        run.configured_algorithm, run.file_seed = configured.get(experiment), seed
        records[experiment].seed_runs.append(run)
    for record in records.values():
        record.seed_runs.sort(key=lambda run: run.file_seed)
    all_settings = list(settings or [])
    for record in records.values():
        evaluated = record.evaluation.settings if record.evaluation is not None else {}
        for setting in evaluated:
            if setting not in all_settings:
                all_settings.append(setting)
    for run in (run for record in records.values() for run in record.runs):
        if run.evaluation is None:
            continue
        for setting in all_settings:
            if run.setting(setting) is None and setting not in run.unsupported:
                notes.append(f"{run.name}: {setting} not in metrics/eval/{run.name}.json")
    return ReportInputs(records, all_settings, notes)
