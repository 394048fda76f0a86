"""The MLflow store behind `metalab.tracking`: preparation, locks, retries, unusable files.

Several processes (``dvc queue start -j 2``) may write to one SQLite store at once: the store
is switched to WAL mode, its creation (schema migrations, the default experiment) and the
creation of the experiment are serialised by a file lock, and writes that still meet a
locked database are retried.

A store that cannot be used (a corrupt or truncated file, a directory where the file should
be, a file or directory without write permission, a full disk) raises `StoreUnusableError`:
one line naming the database file and the fix (move it aside, or ``tracking.enabled:
false`` in params.yaml) instead of SQLAlchemy's traceback. It is checked before the store
is opened and recognised in the errors of every later write.

Also here: the store's housekeeping of runs whose stage was killed outright
(`close_dead_runs`, from the ``host``/``pid`` tags of `process_tags`), and a logged model
written step by step with each write retried (`write_logged_model`).
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, closing, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from metalab.errors import MetalabError

try:  # POSIX only; elsewhere store creation is not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mlflow import MlflowClient

SQLITE_URI_PREFIX = "sqlite:///"

logger = logging.getLogger(__name__)
T = TypeVar("T")

# SQLite's messages for contention that goes away by waiting (MLflow re-raises SQLAlchemy's
# OperationalError as an MlflowException with code TEMPORARILY_UNAVAILABLE).
TRANSIENT_MESSAGES = ("database is locked", "database table is locked")
STORE_RETRIES = 6

# SQLite's messages for a store that waiting cannot fix, by what is wrong with it.
CORRUPT_MESSAGES = ("file is not a database", "database disk image is malformed")
UNWRITABLE_MESSAGES = (
    "attempt to write a readonly database",
    "unable to open database file",
    "readonly database",
    "disk i/o error",
)
FULL_MESSAGES = ("database or disk is full",)


class StoreUnusableError(MetalabError):
    """The MLflow store's database file cannot be used; the message says what to do."""


def sqlite_file(uri: str) -> Path | None:
    """The database file of an SQLite URI with an absolute path; None for anything else."""
    if not uri.startswith(SQLITE_URI_PREFIX):
        return None
    path = uri[len(SQLITE_URI_PREFIX) :].partition("?")[0]
    return Path(path) if os.path.isabs(path) else None


def _messages(error: BaseException) -> str:
    """The lower-cased messages of `error` and the errors it was raised from."""
    texts, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(str(current).lower())
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def is_transient_store_error(error: BaseException) -> bool:
    """Whether `error` is lock contention that a later attempt can get past."""
    if getattr(error, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
        return True
    message = str(error).lower()
    return any(text in message for text in TRANSIENT_MESSAGES)


def _move_aside(database: Path, with_wal: bool = True) -> str:
    """The advice that moves `database` aside; `with_wal` adds the WAL files that belong to
    it (a stale ``-wal`` file next to a new database would be replayed into it)."""
    command = f"mv {shlex.quote(str(database))} {shlex.quote(f'{database}.broken')}"
    if with_wal:
        command += f", and any {database.name}-wal and -shm next to it"
    return f"move it aside ({command})"


DISABLE = "set tracking.enabled: false in params.yaml"


def unusable_store(database: Path, kind: str, detail: str = "") -> StoreUnusableError:
    """The one-line error for `database`; `kind` is ``corrupt``, ``unwritable``, ``full`` or
    ``directory``, `detail` what SQLite or the file system said."""
    where = f"MLflow store {database}"
    if kind == "full":
        return StoreUnusableError(f"{where} cannot be written ({detail}): free space or {DISABLE}")
    if kind == "unwritable":
        fixes = "make it and its directory writable"
        if database.exists() and os.access(database.parent, os.W_OK | os.X_OK):
            fixes += f", {_move_aside(database, with_wal=False)}"
        return StoreUnusableError(f"{where} cannot be written ({detail}): {fixes} or {DISABLE}")
    if kind == "directory":
        return StoreUnusableError(
            f"{where} is a directory, not an SQLite file: "
            f"{_move_aside(database, with_wal=False)} or {DISABLE}"
        )
    return StoreUnusableError(
        f"{where} is not a usable SQLite database ({detail}): {_move_aside(database)} to "
        f"start a new store, or {DISABLE}"
    )


def as_unusable_store(database: Path, error: BaseException) -> StoreUnusableError | None:
    """`error` (from sqlite3, SQLAlchemy or MLflow) as a `StoreUnusableError`, or None when it
    is not about an unusable database file (lock contention, a missing run, a bug)."""
    if isinstance(error, StoreUnusableError) or is_transient_store_error(error):
        return None
    messages = _messages(error)
    for kind, problems in (
        ("corrupt", CORRUPT_MESSAGES),
        ("unwritable", UNWRITABLE_MESSAGES),
        ("full", FULL_MESSAGES),
    ):
        for problem in problems:
            if problem in messages:
                if database.is_dir():
                    return unusable_store(database, "directory", problem)
                return unusable_store(database, kind, problem)
    return None


@contextmanager
def store_errors(database: Path | None) -> Iterator[None]:
    """Re-raise errors that mean `database` is unusable as one-line `StoreUnusableError`s
    (nothing changes for stores that are not SQLite files)."""
    try:
        yield
    except Exception as error:
        unusable = None if database is None else as_unusable_store(database, error)
        if unusable is None:
            raise
        raise unusable from error


def with_store_retries(
    action: Callable[[], T],
    what: str,
    attempts: int = STORE_RETRIES,
    database: Path | None = None,
) -> T:
    """Call `action`; on a locked database wait (exponential backoff with jitter) and retry.

    MLflow already waits up to 20 s on a busy SQLite database per statement; this covers
    what slips through (SQLite returns "database is locked" at once where waiting could
    deadlock). A failed MLflow write is rolled back, so repeating it cannot log twice. With
    `database`, an error that means the file is unusable becomes a `StoreUnusableError`.
    """
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            with store_errors(database):
                return action()
        except Exception as error:
            if attempt == attempts or not is_transient_store_error(error):
                raise
            logger.warning("MLflow store busy during %s (attempt %d): %s", what, attempt, error)
            # Jitter, so two workers that collided do not retry in lockstep.
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")  # pragma: no cover


def check_store_file(database: Path) -> None:
    """Raise `StoreUnusableError` unless `database` can be an SQLite store: a regular file
    (or none yet) that can be read and written, in a directory that can be written (SQLite
    creates its journal files there)."""
    if database.exists() and not database.is_file():
        raise unusable_store(database, "directory")
    directory = database.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        raise unusable_store(database, "unwritable", f"no write permission on {directory}")
    if database.exists() and not os.access(database, os.R_OK | os.W_OK):
        raise unusable_store(database, "unwritable", "no read and write permission")


def check_store_contents(database: Path) -> None:
    """Raise `StoreUnusableError` if SQLite cannot read `database`'s header and schema (random
    bytes, a truncated file); creates an empty file if there is none. Deeper damage shows
    only when MLflow reads the damaged pages: `store_errors` reports it then."""
    try:
        with closing(sqlite3.connect(database, timeout=30)) as connection:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as error:
        unusable = as_unusable_store(database, error)
        if unusable is not None:
            raise unusable from error
        logger.debug("could not check MLflow store %s: %s", database, error)


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
        unusable = as_unusable_store(database, error)
        if unusable is not None:
            raise unusable from error
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
    preparation runs under one file lock per SQLite file, after checking that the file is
    usable (`check_store_file`, `check_store_contents`).
    """
    database = sqlite_file(uri)
    if database is None:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        return with_store_retries(
            lambda: get_or_create_experiment(client, experiment_name), "experiment lookup"
        )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise unusable_store(database, "unwritable", str(error)) from error
    check_store_file(database)
    with ExitStack() as stack:
        try:
            stack.enter_context(store_lock(database))
        except OSError as error:  # e.g. a lock file that cannot be written
            raise unusable_store(database, "unwritable", str(error)) from error
        check_store_contents(database)
        enable_wal(database)
        # Artifacts next to the store (not in the working directory, which for a queued
        # experiment is a temporary workspace deleted after the run).
        store = with_store_retries(
            lambda: SqlAlchemyStore(uri, str(database.parent / "mlruns")),
            "store creation",
            database=database,
        )
        return with_store_retries(
            lambda: get_or_create_experiment(store, experiment_name),
            "experiment creation",
            database=database,
        )


# ------------------------------------------------------------ runs of killed stages
def process_tags() -> dict[str, str]:
    """Which process on which machine opened a run: ``host``, ``pid`` and, on Linux,
    ``process_start`` (so a later process that reuses the pid is not taken for it)."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid())}
    started = process_start(os.getpid())
    if started is not None:
        tags["process_start"] = started
    return tags


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process `pid` from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) ": field 3 on
        return fields[0], fields[19]
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started, as ``<boot id>:<clock ticks since boot>``: unique per
    process across reboots; None where /proc cannot tell (not Linux, process gone)."""
    stat = _proc_stat(pid)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return None if stat is None else f"{boot}:{stat[1]}"


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this machine still runs; with `started` (its
    `process_start`), whether that very process does. In doubt, True."""
    if pid <= 0:
        return True  # not one process (os.kill would signal a group): cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        pass  # e.g. PermissionError: it exists but belongs to another user
    stat = _proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return False  # killed, only waiting for its parent to collect its exit status
    if started is not None:
        current = process_start(pid)
        if current is not None and current != started:
            return False  # the pid now belongs to a later process
    return True


def close_dead_runs(
    client: MlflowClient, experiment_id: str, stage: str, database: Path | None = None
) -> list[str]:
    """Mark KILLED, ending now, the RUNNING runs of `stage` in the experiment that a process
    of this host opened and that process is gone (SIGKILL, out of memory, power loss);
    return their ids. Runs of live processes (concurrent queue workers), of other hosts
    and without ``host``/``pid`` tags are left alone."""
    if "'" in stage:  # cannot be quoted in a search filter; DVC stage names never are
        return []
    host = socket.gethostname()
    found = with_store_retries(
        lambda: client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.dvc_stage = '{stage}'",
            max_results=1000,
        ),
        "search_runs",
        database=database,
    )
    closed = []
    for candidate in found:
        tags = candidate.data.tags
        if tags.get("host") != host or not tags.get("pid", "").isdigit():
            continue
        if process_alive(int(tags["pid"]), tags.get("process_start") or None):
            continue
        run_id, ended = candidate.info.run_id, int(time.time() * 1000)
        with_store_retries(
            partial(client.set_terminated, run_id, "KILLED", end_time=ended),
            "set_terminated",
            database=database,
        )
        logger.info(
            "closed MLflow run %s of %s as KILLED: process %s is gone", run_id, stage, tags["pid"]
        )
        closed.append(run_id)
    return closed


# --------------------------------------------------------------------- logged models
def write_logged_model(
    client: MlflowClient,
    run_id: str,
    save: Callable[[Path, Any], None],
    name: str,
    *,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, Any] | None = None,
    database: Path | None = None,
) -> str:
    """Create the MLflow logged model `name` of run `run_id` (in the run's experiment, with
    the run's params and `tags`), let `save(path, mlflow_model)` write its directory,
    upload it, log `metrics` on the run linked to the model, mark it READY and return its
    id. Unlike ``mlflow.pyfunc.log_model`` this needs no active run or experiment, and
    each store write is retried on a locked database (`with_store_retries`); a model whose
    directory could not be written or uploaded is marked FAILED and the error raised."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model
    from mlflow.tracking.context.registry import resolve_tags

    def retried(action: Callable[[], T], what: str) -> T:
        return with_store_retries(action, what, database=database)

    run = retried(lambda: client.get_run(run_id), "get_run")
    model = retried(
        lambda: client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=dict(run.data.params),
            tags=resolve_tags({key: str(value) for key, value in (tags or {}).items()}),
        ),
        "create_logged_model",
    )
    model_id = model.model_id
    try:
        outputs = [LoggedModelOutput(model_id, step=0)]
        retried(lambda: client.log_outputs(run_id, outputs), "log_outputs")
        with tempfile.TemporaryDirectory(prefix="metalab-model-") as directory:
            local = Path(directory) / name
            save(
                local,
                Model(model.artifact_location, run_id, model_uuid=model_id, model_id=model_id),
            )
            retried(lambda: client.log_model_artifacts(model_id, str(local)), "log_model")
        if metrics:
            now = int(time.time() * 1000)
            linked = [Metric(key, float(value), now, 0, model_id) for key, value in metrics.items()]
            retried(lambda: client.log_batch(run_id, metrics=linked, synchronous=True), "log_batch")
        retried(lambda: client.finalize_logged_model(model_id, LoggedModelStatus.READY), "finalize")
    except BaseException:
        try:
            client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        except Exception as error:  # the original error matters more
            logger.warning("could not mark MLflow model %s as FAILED: %s", model_id, error)
        raise
    return model_id
