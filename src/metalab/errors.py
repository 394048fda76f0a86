"""The library's expected failures: each is reported to the user as one line.

Stages (`metalab.cli`) turn a `MetalabError` into exit status 1 and
`metalab.schema.ParamsError` into exit status 2; the library never depends on the CLI.
"""

from __future__ import annotations


class MetalabError(RuntimeError):
    """An expected failure (bad input file, diverged training, ...) phrased as one line."""


class DivergedError(MetalabError):
    """Training produced a non-finite loss; the message says what to change."""
