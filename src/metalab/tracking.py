"""MLflow tracking for every stage: params, metric curves, tags and resource figures.

The store defaults to ``sqlite:///mlflow.db`` in the project root; ``MLFLOW_TRACKING_URI``
overrides it. A relative SQLite path resolves against ``DVC_ROOT`` (which DVC sets for every
stage and, in ``dvc exp run --queue``/``--temp``, points at the main project rather than the
throwaway workspace under ``.dvc/tmp/exps``), else against the working directory, so runs of
queued experiments land in the project's store. Artifacts go to ``mlruns/`` next to the
SQLite file.

Several processes (``dvc queue start -j 2``) may write to one SQLite store at once: the store
is switched to WAL mode, its creation (schema migrations, the default experiment) and the
creation of the experiment are serialised by a file lock, and writes that still meet a
locked database are retried.

Every run carries the tags ``git_commit``, ``dvc_stage`` and, inside ``dvc exp run``,
``dvc_exp_name`` and ``dvc_exp_baseline_rev``, and ends with the figures ``wall_time_s``,
``tasks_per_s`` (where the stage counts tasks), ``peak_memory_mb`` and the ``device`` it ran
on.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from metalab.runtime import cpu_model
from metalab.schema import TrackingConfig

try:  # POSIX only; elsewhere store creation is not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_URI_PREFIX = "sqlite:///"

# Set before mlflow is imported anywhere: no telemetry leaves this machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

logger = logging.getLogger(__name__)
T = TypeVar("T")

# SQLite's messages for contention that goes away by waiting (MLflow re-raises SQLAlchemy's
# OperationalError as an MlflowException with code TEMPORARILY_UNAVAILABLE).
TRANSIENT_MESSAGES = ("database is locked", "database table is locked")
STORE_RETRIES = 6


def project_root() -> Path:
    """The directory relative store paths resolve against: ``DVC_ROOT`` when DVC runs the
    stage (the main project even for queued experiments), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """`uri` with a relative SQLite file path made absolute under `root`; other URIs
    (absolute SQLite paths, in-memory SQLite, servers, other databases) unchanged."""
    if not uri.startswith(SQLITE_URI_PREFIX):
        return uri
    path, separator, query = uri[len(SQLITE_URI_PREFIX) :].partition("?")
    if not path or path == ":memory:" or os.path.isabs(path):
        return uri
    return f"{SQLITE_URI_PREFIX}{(root / path).resolve()}{separator}{query}"


def tracking_uri() -> str:
    """The store every stage logs to (see the module docstring)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return resolve_tracking_uri(uri, project_root())


def sqlite_file(uri: str) -> Path | None:
    """The database file of an SQLite URI with an absolute path; None for anything else."""
    if not uri.startswith(SQLITE_URI_PREFIX):
        return None
    path = uri[len(SQLITE_URI_PREFIX) :].partition("?")[0]
    return Path(path) if os.path.isabs(path) else None


def is_transient_store_error(error: BaseException) -> bool:
    """Whether `error` is lock contention that a later attempt can get past."""
    if getattr(error, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
        return True
    message = str(error).lower()
    return any(text in message for text in TRANSIENT_MESSAGES)


def with_store_retries(action: Callable[[], T], what: str, attempts: int = STORE_RETRIES) -> T:
    """Call `action`; on a locked database wait (exponential backoff with jitter) and retry.

    MLflow already waits up to 20 s on a busy SQLite database per statement; this covers
    what slips through (SQLite returns "database is locked" at once where waiting could
    deadlock). A failed MLflow write is rolled back, so repeating it cannot log twice.
    """
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:
            if attempt == attempts or not is_transient_store_error(error):
                raise
            logger.warning("MLflow store busy during %s (attempt %d): %s", what, attempt, error)
            # Jitter, so two workers that collided do not retry in lockstep.
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def store_lock(database: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock for `database` (flock on a side file)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = database.with_name(f"{database.name}-init.lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def enable_wal(database: Path) -> bool:
    """Put the SQLite file in WAL mode (persistent; creates the file if needed).

    In WAL mode readers (the MLflow UI, a finished worker reading back) never block the
    writer and the writer never blocks them; writers still take turns, waiting on the busy
    timeout. Returns False, leaving the default rollback journal, if the switch is
    impossible (e.g. a file system without shared memory).
    """
    try:
        with closing(sqlite3.connect(database, timeout=30)) as connection:
            mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            return str(mode).lower() == "wal"
    except sqlite3.Error as error:
        logger.warning("could not switch %s to WAL mode: %s", database, error)
        return False


def get_or_create_experiment(store: Any, name: str) -> str:
    """The id of the active experiment `name` in `store` (an MlflowClient or a tracking
    store), created if missing; tolerates another process creating it at the same time."""
    from mlflow.exceptions import MlflowException

    experiment = store.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(store.create_experiment(name))
        except MlflowException as error:
            # Lost the race against another process: use the experiment it created.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = store.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) "
            "or set another tracking.experiment_name in params.yaml"
        )
    return str(experiment.experiment_id)


def prepare_experiment(uri: str, experiment_name: str) -> str:
    """Make sure the store at `uri` and its experiment exist; return the experiment id.

    MLflow creates a fresh SQLite store (schema migrations, the ``Default`` experiment)
    without any inter-process lock, and ``mlflow.set_experiment`` has a create race: two
    queue workers starting at once can crash or log into ``Default``. Here the whole
    preparation runs under one file lock per SQLite file.
    """
    database = sqlite_file(uri)
    if database is None:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        return with_store_retries(
            lambda: get_or_create_experiment(client, experiment_name), "experiment lookup"
        )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    database.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(database):
        enable_wal(database)
        # Artifacts next to the store (not in the working directory, which for a queued
        # experiment is a temporary workspace deleted after the run).
        store = with_store_retries(
            lambda: SqlAlchemyStore(uri, str(database.parent / "mlruns")), "store creation"
        )
        return with_store_retries(
            lambda: get_or_create_experiment(store, experiment_name), "experiment creation"
        )


def _cuda_in_use() -> bool:
    """Whether this process has torch loaded and a CUDA device (a stage that never imported
    torch, such as download, never initialises CUDA here)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


def device_name() -> str:
    """The accelerator's name, or the CPU model."""
    if _cuda_in_use():
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_model()


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
    if _cuda_in_use():
        import torch

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
    """Logging handle of one stage run. With tracking disabled, it only measures.

    Writes go through an explicit ``MlflowClient`` (not mlflow's global active run), each
    retried on a locked database.
    """

    def __init__(self, run_id: str | None, client: MlflowClient | None = None) -> None:
        self.run_id = run_id
        self.client = client
        self.meter = ResourceMeter()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id is None or self.client is None:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()]
        self._log_batch(metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run_id is None or self.client is None:
            return
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps params per request
            self._log_batch(params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id is None or self.client is None:
            return
        from mlflow.entities import RunTag

        self._log_batch(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None or self.client is None:
            return
        client, run_id = self.client, self.run_id
        with_store_retries(
            lambda: client.log_artifact(run_id, str(path), artifact_path=artifact_path),
            "log_artifact",
        )

    def _log_batch(self, **entities: Any) -> None:
        client, run_id = self.client, self.run_id
        assert client is not None and run_id is not None
        # synchronous: an asynchronous write would fail outside the retry.
        with_store_retries(
            lambda: client.log_batch(run_id, synchronous=True, **entities), "log_batch"
        )


def run_tags(stage: str, extra: Mapping[str, Any] | None) -> dict[str, str]:
    """The tags that lead from a run back to its code and params: the commit, the DVC stage
    and, inside ``dvc exp run``, the DVC experiment name and its baseline commit."""
    tags: dict[str, Any] = {"git_commit": git_commit(), "dvc_stage": stage, "device": device_name()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    tags.update(extra or {})
    return {key: str(value) for key, value in tags.items()}


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    tracking: TrackingConfig,
    *,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
) -> Iterator[StageRun]:
    """Open an MLflow run for a stage; on exit log the resource figures and close it.

    `stage` is the DVC stage name (``train@maml``; the run is named ``train maml``),
    `params` the settings it read (logged flattened), `tracking` params.yaml's section;
    ``enabled=False`` (e.g. torchrun ranks other than 0) only measures. A failing stage
    still logs its figures and is marked FAILED (KILLED on Ctrl-C).
    """
    if not (enabled and tracking.enabled):
        yield StageRun(None)
        return
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # for any direct mlflow call made during the stage
    experiment_id = prepare_experiment(uri, tracking.experiment_name)
    client = mlflow.MlflowClient(uri)
    # resolve_tags adds what mlflow.start_run would (user, source), so the UI shows them.
    all_tags = resolve_tags(run_tags(stage, tags))
    created = with_store_retries(
        lambda: client.create_run(experiment_id, tags=all_tags, run_name=stage.replace("@", " ")),
        "create_run",
    )
    run = StageRun(created.info.run_id, client)
    status = "FAILED"
    try:
        flat = {key: "null" if value is None else value for key, value in flatten(params).items()}
        run.log_params(flat)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            run.log_metrics(run.meter.figures())
        finally:
            with_store_retries(
                lambda: client.set_terminated(created.info.run_id, status), "set_terminated"
            )
