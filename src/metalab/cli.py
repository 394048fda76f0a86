"""What every stage script shares: argument parsing, params loading, error exits.

Exit status 2 for a params.yaml problem (one line naming the key), 1 for any other
expected failure (bad archive, missing input, diverged training), with a one-line
message instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from metalab.params import Params, ParamsError, load_params
from metalab.runtime import keep_freed_memory


class StageError(RuntimeError):
    """An expected failure of a stage, reported as one line (exit status 1)."""


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_stage(
    main: Callable[[argparse.Namespace, Params], None], parser: argparse.ArgumentParser
) -> None:
    """Parse arguments, load params, call `main`; map known failures to exit codes.

    Every stage process reuses freed memory (`metalab.runtime.keep_freed_memory`)."""
    args = parser.parse_args()
    keep_freed_memory()
    try:
        params = load_params(args.params)
        main(args, params)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (StageError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
