"""``metalab-ui``: the MLflow UI on the project's tracking store, on the loopback interface.

Runs ``mlflow server`` on the store the stages log to (``metalab.tracking.tracking_uri``:
``mlflow.db`` in the project root unless ``MLFLOW_TRACKING_URI`` says otherwise), bound to
127.0.0.1 so the runs are not exposed to the network.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from metalab.tracking import project_root, resolve_tracking_uri, sqlite_file, tracking_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


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
    if args.backend_store_uri:
        uri = resolve_tracking_uri(args.backend_store_uri, project_root())
    else:
        uri = tracking_uri()
    command = server_command(uri, args.host, args.port)
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # The server's background job runners (GenAI features, not used here) would add a
    # dozen processes and seconds of startup; an explicit setting still wins.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # exec: Ctrl-C and signals reach the server directly, no wrapper process stays behind.
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
