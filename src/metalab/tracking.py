"""MLflow tracking for every stage: params, metric curves, tags and resource figures.

The store defaults to ``sqlite:///mlflow.db`` in the working directory (the project root,
where DVC runs stages); ``MLFLOW_TRACKING_URI`` overrides it. Every run carries the tags
``git_commit``, ``dvc_stage`` and, inside ``dvc exp run``, ``dvc_exp_name``, and ends
with the figures ``wall_time_s``, ``tasks_per_s`` (where the stage counts tasks),
``peak_memory_mb`` and the ``device`` it ran on.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Set before mlflow is imported anywhere: no telemetry leaves this machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def device_name() -> str:
    """The accelerator's name, or the CPU model."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def peak_memory_mb() -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, else peak RSS of this process
    and of its largest finished child (worker pools)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # ru_maxrss is in KiB on Linux


class ResourceMeter:
    """Wall time, tasks processed and peak memory of one stage run."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.tasks = 0
        self.busy_seconds = 0.0  # time spent on the counted tasks (excludes validation etc.)

    def add_tasks(self, count: int, seconds: float | None = None) -> None:
        self.tasks += count
        if seconds is not None:
            self.busy_seconds += seconds

    def figures(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        figures = {"wall_time_s": wall, "peak_memory_mb": peak_memory_mb()}
        if self.tasks:
            figures["tasks_per_s"] = self.tasks / (self.busy_seconds or wall)
        return figures


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class StageRun:
    """Logging handle of one stage run. With tracking disabled, it only measures."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.meter = ResourceMeter()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.set_tags({key: str(value) for key, value in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    experiment_name: str = "metalab",
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
) -> Iterator[StageRun]:
    """Open an MLflow run for a stage; on exit log the resource figures and close it.

    `stage` is the DVC stage name (``train@maml``); `params` are logged flattened.
    A failing stage still logs its figures and is marked FAILED.
    """
    if not enabled:
        yield StageRun(None)
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_name)
    all_tags = {"git_commit": git_commit(), "dvc_stage": stage, "device": device_name()}
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    all_tags.update(tags or {})
    active = mlflow.start_run(run_name=run_name or stage)
    run = StageRun(active.info.run_id)
    status = "FAILED"
    try:
        run.set_tags(all_tags)
        flat = {key: "null" if value is None else value for key, value in flatten(params).items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow caps params per request
            mlflow.log_params(dict(items[start : start + 100]))
        yield run
        status = "FINISHED"
    finally:
        run.log_metrics(run.meter.figures())
        mlflow.end_run(status=status)
