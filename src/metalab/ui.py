"""``metalab-ui``: the MLflow UI on the project's tracking store, on the loopback interface.

Runs ``mlflow server`` on the store the stages log to (``mlflow.db`` in the project root
unless ``MLFLOW_TRACKING_URI`` says otherwise, as in `metalab.tracking`), bound to 127.0.0.1
so the runs are not exposed to the network. The project root is ``DVC_ROOT`` or else found
from the working directory upwards (`find_project_root`), so the UI can be started from any
folder of the project. Outside a project, or where the SQLite store does not exist yet, it
exits with one line instead of opening a new, empty store.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from metalab.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri, sqlite_file

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


class NoStoreError(Exception):
    """The store to browse cannot be found; the message says why, in one line."""


def find_project_root(start: Path) -> Path | None:
    """The DVC project `start` is in: the nearest directory at or above it holding ``.dvc/``
    (the repository root, where stages log), else the nearest holding ``dvc.yaml``; None
    outside any. Directories inside a ``.dvc`` folder (the temporary workspaces of queued
    experiments) are passed over, so they lead to the main project."""
    candidates = [start, *start.parents]
    candidates = [path for path in candidates if ".dvc" not in path.parts]
    for marker, is_marker in ((".dvc", Path.is_dir), ("dvc.yaml", Path.is_file)):
        for directory in candidates:
            if is_marker(directory / marker):
                return directory
    return None


def store_uri(uri: str | None = None, cwd: Path | None = None) -> str:
    """The store to browse: `uri` (``--backend-store-uri``), else ``MLFLOW_TRACKING_URI``,
    else the project's ``sqlite:///mlflow.db``; a relative SQLite path resolves against
    ``DVC_ROOT`` or the project `cwd` is in (`find_project_root`). Raises `NoStoreError`
    when that project or the SQLite file does not exist."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    cwd = (cwd or Path.cwd()).resolve()
    resolved = uri
    if resolve_tracking_uri(uri, Path("/")) != uri:  # a relative SQLite path: needs a root
        root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else None
        root = root or find_project_root(cwd)
        if root is None:
            raise NoStoreError(
                f"{cwd} is not inside a metalab project (no .dvc/ or dvc.yaml here or above), "
                f"so there is no {uri} to open: run metalab-ui in the project, or set "
                "MLFLOW_TRACKING_URI"
            )
        resolved = resolve_tracking_uri(uri, root.resolve())
    database = sqlite_file(resolved)
    if database is not None and not database.is_file():
        raise NoStoreError(
            f"no MLflow store at {database}: no stage has logged there yet (run one, e.g. "
            "`dvc repro`), or set MLFLOW_TRACKING_URI"
        )
    return resolved


def server_command(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line for the store at `uri`."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    database = sqlite_file(uri)
    if database is not None:
        # Artifacts uploaded through the UI go next to the store, not into the directory the
        # command happens to be started from.
        command += ["--artifacts-destination", str(database.parent / "mlartifacts")]
    # One worker suffices for one person browsing and keeps memory low.
    command += ["--host", host, "--port", str(port), "--workers", str(workers)]
    return command


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="metalab-ui",
        description="Open the MLflow UI on the project's tracking store, on 127.0.0.1 only.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="interface to bind (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=None,
        help="MLflow store (default: the one the stages log to)",
    )
    args = parser.parse_args(argv)
    try:
        uri = store_uri(args.backend_store_uri)
    except NoStoreError as error:
        print(f"metalab-ui: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    command = server_command(uri, args.host, args.port)
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # The server's background job runners (GenAI features, not used here) would add a
    # dozen processes and seconds of startup; an explicit setting still wins.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # exec: Ctrl-C and signals reach the server directly, no wrapper process stays behind.
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
