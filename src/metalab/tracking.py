"""MLflow tracking for every stage: params, metric curves, tags and resource figures.

The store defaults to ``sqlite:///mlflow.db`` in the project root; ``MLFLOW_TRACKING_URI``
overrides it. A relative SQLite path resolves against ``DVC_ROOT`` (which DVC sets for every
stage and, in ``dvc exp run --queue``/``--temp``, points at the main project rather than the
throwaway workspace under ``.dvc/tmp/exps``), else against the working directory, so runs of
queued experiments land in the project's store. Artifacts go to ``mlruns/`` next to the
SQLite file.

Preparing the store (WAL mode, a file lock around its creation, retries of writes that meet
a locked database, one-line errors for a corrupt or unwritable file) is
`metalab.tracking_store`'s.

Every run carries the tags ``git_commit``, ``dvc_stage``, ``host`` and ``pid`` (with
``process_start``, the process's identity on Linux), where it computed (``device``,
``device_name`` and, for a stage given its torch device, ``threads``, ``torch_version`` and
``cuda_version``: `metalab.device.DeviceRecord`) and, inside ``dvc exp run``,
``dvc_exp_name`` and ``dvc_exp_baseline_rev``, and ends with the figures ``wall_time_s``,
``tasks_per_s`` (where the stage counts tasks) and the memory figures of `memory_figures`:
``peak_memory_mb`` (peak RSS of the host process, on every device) and, for a stage on a
CUDA device, ``gpu_peak_allocated_mb`` and ``gpu_peak_reserved_mb`` of that device. Nothing
here touches ``torch.cuda`` unless the stage's device is a CUDA device: a CPU run never
initialises CUDA, and a stage without torch work (download) never imports torch.

``system_metrics=True`` (training and evaluation) also samples the machine every
`SYSTEM_METRICS_INTERVAL_S` seconds with MLflow's system metrics monitor (``system/...``
curves: CPU, memory, disk, network; GPU utilisation and memory where ``nvidia-ml-py``, the
``gpu`` extra, is installed). ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides the
interval. A monitor that cannot start or stop only logs a warning.

A run is named ``train@maml · 859b862`` (`run_name`); `StageRun.log_archives` records the
Omniglot archives as dataset inputs, `StageRun.log_model` an MLflow model on the run.

A stage killed outright (SIGKILL, out of memory, power loss) cannot close its run: the
next start of the same stage marks it KILLED once its process is gone (`close_dead_runs`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalab.errors import MetalabError
from metalab.runtime import cpu_model, max_rss_mb
from metalab.schema import TrackingConfig
from metalab.tracking_store import (
    SQLITE_URI_PREFIX,
    close_dead_runs,
    prepare_experiment,
    process_tags,
    sqlite_file,
    store_errors,
    with_store_retries,
    write_logged_model,
)

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SYSTEM_METRICS_INTERVAL_S = 10.0
"""Seconds between two samples of the system metrics monitor (``system_metrics=True``)."""

# Set before mlflow is imported anywhere: no telemetry leaves this machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

logger = logging.getLogger(__name__)


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


def _on_cuda(device: torch.device | None) -> bool:
    """Whether `device` is a CUDA device (without importing torch or touching CUDA)."""
    return device is not None and device.type == "cuda"


def device_tags(device: torch.device | None) -> dict[str, str]:
    """Where a run computed: `metalab.device.DeviceRecord`'s tags for a stage's torch
    `device`; for a stage without torch work (None), the CPU (``device`` and its model as
    ``device_name``), without importing torch."""
    if device is None:
        return {"device": "cpu", "device_name": cpu_model()}
    from metalab.device import device_record

    return device_record(device).tags()


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
    """Peak RSS so far of this process and of its largest finished child (worker pools),
    MB: host memory, whatever device the stage computes on."""
    return max(max_rss_mb(resource.RUSAGE_SELF), max_rss_mb(resource.RUSAGE_CHILDREN))


def reset_peak_memory(device: torch.device | None) -> None:
    """Start the GPU peak figures of `memory_figures` afresh: on a CUDA `device`, reset its
    allocator's peak statistics; nothing otherwise (host RSS peaks cannot be reset)."""
    if _on_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def memory_figures(device: torch.device | None) -> dict[str, float]:
    """The memory a stage used, MB, for its metrics file and MLflow run: ``peak_memory_mb``
    (host peak RSS, `peak_memory_mb()`) always; on a CUDA `device` also
    ``gpu_peak_allocated_mb`` and ``gpu_peak_reserved_mb``, the peaks of that device's
    allocator (since `reset_peak_memory`). Touches CUDA only for a CUDA `device`."""
    figures = {"peak_memory_mb": peak_memory_mb()}
    if _on_cuda(device):
        import torch

        figures["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        figures["gpu_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return figures


class ResourceMeter:
    """Wall time, tasks processed and peak memory of one stage run on `device` (None: a
    stage without torch work)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.started = time.perf_counter()
        self.device = device
        self.tasks = 0
        self.busy_seconds = 0.0  # time spent on the counted tasks (excludes validation etc.)

    def add_tasks(self, count: int, seconds: float | None = None) -> None:
        self.tasks += count
        if seconds is not None:
            self.busy_seconds += seconds

    def figures(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        figures = {"wall_time_s": wall, **memory_figures(self.device)}
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


# MLflow allows digests of at most 36 characters: an archive's digest is its SHA-256's first
# 12 hex digits (as the download stage prints it), the full hash is in the profile.
DATASET_DIGEST_CHARS = 12


def dataset_source(location: str) -> tuple[str, str]:
    """(source type, source JSON) of a dataset at `location` as MLflow's dataset sources
    write them: ``http`` ``{"url": ...}`` for an http(s) URL, else ``local`` ``{"uri": ...}``."""
    if location.startswith(("http://", "https://")):
        return "http", json.dumps({"url": location})
    return "local", json.dumps({"uri": location})


class StageRun:
    """Logging handle of one stage run. With tracking disabled, it only measures.

    Writes go through an explicit ``MlflowClient`` (not mlflow's global active run), each
    retried on a locked database; one that finds the SQLite `database` unusable raises a
    one-line `metalab.tracking_store.StoreUnusableError`.
    """

    def __init__(
        self,
        run_id: str | None,
        client: MlflowClient | None = None,
        database: Path | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.run_id = run_id
        self.client = client
        self.database = database
        self.device = device
        self.meter = ResourceMeter(device)

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
            database=self.database,
        )

    def log_dataset(
        self,
        name: str,
        digest: str,
        source: str,
        *,
        context: str = "training",
        profile: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the dataset `name` (content `digest`, at most 36 characters) read from
        `source` (a URL or a file path) as an input of this run for `context` (``training``,
        ``download``...), with `profile` (counts, the full hash). The same name and digest
        on several runs is one MLflow dataset: it leads to every run that used it."""
        if self.run_id is None or self.client is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source_type, source_json = dataset_source(source)
        dataset = Dataset(
            name=name,
            digest=digest,
            source_type=source_type,
            source=source_json,
            profile=None if profile is None else json.dumps(dict(profile)),
        )
        entry = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        client, run_id = self.client, self.run_id
        with_store_retries(
            lambda: client.log_inputs(run_id, datasets=[entry]),
            "log_inputs",
            database=self.database,
        )

    def log_archives(self, archives: Mapping[str, Mapping[str, Any]], context: str) -> None:
        """Log each Omniglot archive as the dataset input ``omniglot/<name>``: `archives`
        maps its name to its metrics/data.json record (``source``, ``sha256``, size and
        counts, the profile); the digest is the hash's first `DATASET_DIGEST_CHARS` digits,
        the source the URL or mirror file (resolved against `project_root`) it came from."""
        for name, record in archives.items():
            source = str(record["source"])
            if source.startswith(("http://", "https://")):
                location = source.rstrip("/") + f"/{name}.zip"
            else:
                location = str((project_root() / source / f"{name}.zip").resolve())
            digest = str(record["sha256"])[:DATASET_DIGEST_CHARS]
            profile = {key: value for key, value in record.items() if key != "source"}
            self.log_dataset(f"omniglot/{name}", digest, location, context=context, profile=profile)

    def log_model(
        self,
        save: Callable[[Path, Model], None],
        name: str = "model",
        *,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Log an MLflow model on this run (an MLflow 3 logged model carrying the run's
        params) and return its id; None with tracking disabled. `save(path, mlflow_model)`
        writes the model directory (``mlflow.pyfunc.save_model(path,
        mlflow_model=mlflow_model, ...)``); it loads as ``runs:/<run id>/<name>``.
        `metrics` are logged on the run linked to the model. See
        `metalab.tracking_store.write_logged_model`."""
        if self.run_id is None or self.client is None:
            return None
        return write_logged_model(
            self.client, self.run_id, save, name, metrics=metrics, tags=tags, database=self.database
        )

    def _log_batch(self, **entities: Any) -> None:
        client, run_id = self.client, self.run_id
        assert client is not None and run_id is not None
        # synchronous: an asynchronous write would fail outside the retry.
        with_store_retries(
            lambda: client.log_batch(run_id, synchronous=True, **entities),
            "log_batch",
            database=self.database,
        )


def run_tags(
    stage: str, extra: Mapping[str, Any] | None, device: torch.device | None = None
) -> dict[str, str]:
    """The tags that lead from a run back to its code and params: the commit, the DVC stage
    and, inside ``dvc exp run``, the DVC experiment name and its baseline commit; to where
    it computed (`device_tags`); and to the process that ran it (`process_tags`)."""
    tags: dict[str, Any] = {"git_commit": git_commit(), "dvc_stage": stage}
    tags.update(device_tags(device))
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    tags.update(extra or {})
    tags.update(process_tags())  # after `extra`: closing runs of killed stages relies on them
    return {key: str(value) for key, value in tags.items()}


def run_name(stage: str, tags: Mapping[str, str]) -> str:
    """A run's name in the UI, from its `tags` (`run_tags`): the DVC stage, inside ``dvc exp
    run`` the DVC experiment, and the short commit, e.g. ``train@maml · 859b862`` or
    ``train@anil_s1 · anil-s1-lr-0.3 · 859b862-dirty`` (no commit outside git)."""
    parts = [stage]
    if tags.get("dvc_exp_name"):
        parts.append(tags["dvc_exp_name"])
    commit = tags.get("git_commit", "unknown")
    if commit and commit != "unknown":
        dirty = commit.endswith("-dirty")
        parts.append(commit.removesuffix("-dirty")[:7] + ("-dirty" if dirty else ""))
    return " · ".join(parts)


def start_system_metrics(
    run_id: str, uri: str, database: Path | None = None
) -> SystemMetricsMonitor | None:
    """Start MLflow's system metrics monitor on run `run_id` of store `uri`, sampling every
    `SYSTEM_METRICS_INTERVAL_S` seconds (its writes retried on a locked database like the
    stage's own); None, with a warning, if it cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=uri
        )
        client = getattr(getattr(monitor, "mlflow_logger", None), "client", None)
        if client is not None:  # its writes share the SQLite file with the stage's
            log_batch = client.log_batch

            def retried_log_batch(*args: Any, **kwargs: Any) -> Any:
                return with_store_retries(
                    lambda: log_batch(*args, **kwargs),
                    "log_batch (system metrics)",
                    database=database,
                )

            client.log_batch = retried_log_batch
        monitor.start()
    except Exception as error:  # the stage's work matters more than its system metrics
        logger.warning("could not start the MLflow system metrics monitor: %s", error)
        return None
    return monitor


def finish_system_metrics(monitor: SystemMetricsMonitor | None) -> None:
    """Stop `monitor` (from `start_system_metrics`) and log what it still holds; a failure
    only logs a warning."""
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as error:
        logger.warning("could not stop the MLflow system metrics monitor: %s", error)


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    tracking: TrackingConfig,
    *,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
    device: torch.device | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """Open an MLflow run for a stage; on exit log the resource figures and close it.

    `stage` is the DVC stage name (``train@maml``; the run is named by `run_name`),
    `params` the settings it read (logged flattened), `tracking` params.yaml's section;
    ``enabled=False`` (e.g. torchrun ranks other than 0) only measures. `device` is the
    torch device the stage computes on (None for a stage without torch work): the run is
    tagged with it (`device_tags`), a CUDA device's peak memory statistics are reset here
    and its peaks logged at the end (`memory_figures`). ``system_metrics=True`` samples
    the machine during the run (MLflow's system metrics monitor; see the module
    docstring). A failing stage still logs its figures and is marked FAILED (KILLED on
    Ctrl-C). Runs of earlier processes of this stage killed outright are closed first
    (`close_dead_runs`). An unusable SQLite store raises a one-line
    `metalab.errors.MetalabError`.
    """
    reset_peak_memory(device)
    if not (enabled and tracking.enabled):
        yield StageRun(None, device=device)
        return
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # for any direct mlflow call made during the stage
    experiment_id = prepare_experiment(uri, tracking.experiment_name)
    database = sqlite_file(uri)
    with store_errors(database):
        client = mlflow.MlflowClient(uri)
    # resolve_tags adds what mlflow.start_run would (user, source), so the UI shows them.
    all_tags = resolve_tags(run_tags(stage, tags, device))
    created = with_store_retries(
        lambda: client.create_run(experiment_id, tags=all_tags, run_name=run_name(stage, all_tags)),
        "create_run",
        database=database,
    )
    run = StageRun(created.info.run_id, client, database, device=device)
    status = "FAILED"
    monitor = None
    try:
        try:
            close_dead_runs(client, experiment_id, stage, database)
        except MetalabError:
            raise
        except Exception as error:  # housekeeping: never worth failing the stage for
            logger.warning("could not close the MLflow runs of killed %s stages: %s", stage, error)
        flat = {key: "null" if value is None else value for key, value in flatten(params).items()}
        run.log_params(flat)
        if system_metrics:
            monitor = start_system_metrics(created.info.run_id, uri, database)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            finish_system_metrics(monitor)
            run.log_metrics(run.meter.figures())
        finally:
            with_store_retries(
                lambda: client.set_terminated(created.info.run_id, status),
                "set_terminated",
                database=database,
            )
