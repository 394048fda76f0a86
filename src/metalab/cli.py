"""What every stage script shares: argument parsing, params loading, error exits.

A stage is ``run_stage(main, parser, load)``: parse the arguments, load (and validate) the
params sections it reads with ``load`` (`metalab.params.load_params`, or
`metalab.data.config.load_data_params` for the data stages), then ``main(args, params)``.
Exit status 2 for a params.yaml problem (one line naming the key), 1 for any other
expected failure (bad archive, missing input, diverged training), with a one-line
message instead of a traceback. Plumbing only: nothing here decides a number.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from metalab.errors import MetalabError
from metalab.runtime import keep_freed_memory
from metalab.schema import ParamsError

P = TypeVar("P")


class StageError(MetalabError):
    """An expected failure a stage script detects itself, reported as one line (exit 1)."""


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_stage(
    main: Callable[[argparse.Namespace, P], None],
    parser: argparse.ArgumentParser,
    load: Callable[[str], P],
) -> None:
    """Parse arguments, ``load(args.params)``, call `main`; map known failures to exit codes.

    Every stage process reuses freed memory (`metalab.runtime.keep_freed_memory`)."""
    args = parser.parse_args()
    keep_freed_memory()
    try:
        params = load(args.params)
        main(args, params)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (MetalabError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
