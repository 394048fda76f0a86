"""Fetch the two Omniglot image archives from a list of sources, verified.

``fetch_archives`` tries a list of sources (local directories or http(s) base URLs, e.g.
``metalab.data.archives.OFFICIAL_URL``) in order for each archive; every candidate lands in
a temporary ``.part`` file next to its final path, is checked with
``metalab.data.archives.verify_archive`` and only then renamed onto
``<destination>/<name>.zip``. The archive layout is described in ``metalab.data.archives``.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from metalab.data.archives import (
    OFFICIAL_COUNTS,
    ArchiveCounts,
    ArchiveError,
    ArchiveSummary,
    verify_archive,
)
from metalab.errors import MetalabError
from metalab.io import atomic_path

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20  # download block size


class DownloadError(MetalabError):
    """No source yielded a valid archive; ``failures`` maps archive name to (source, reason)."""

    def __init__(
        self, message: str, failures: dict[str, list[tuple[str, str]]] | None = None
    ) -> None:
        super().__init__(message)
        self.failures = failures or {}


class _CandidateError(Exception):
    """One source could not deliver an archive; the message is the one-line reason."""


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _archive_url(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + f"/{name}.zip"


def _describe(source: str, name: str) -> str:
    """Where ``source`` would hold ``<name>.zip``: a URL or an absolute file path."""
    if _is_url(source):
        return _archive_url(source, name)
    return str(Path(source).absolute() / f"{name}.zip")


def _download(url: str, target: Path, timeout: float, progress: bool) -> None:
    """Stream ``url`` into ``target`` (``timeout`` applies to connecting and to each read)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length_header = response.headers.get("Content-Length", "")
            total = int(length_header) if length_header.isdigit() else None
            received = 0
            with (
                open(target, "wb") as file,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=url.rsplit("/", 1)[-1],
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while block := response.read(_CHUNK_BYTES):
                    file.write(block)
                    received += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as error:
        raise _CandidateError(f"HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise _CandidateError(f"cannot connect ({error.reason})") from error
    except TimeoutError as error:
        raise _CandidateError(f"timed out after {timeout:g} s") from error
    except (http.client.HTTPException, OSError) as error:
        raise _CandidateError(f"transfer failed ({type(error).__name__}: {error})") from error
    if total is not None and received != total:
        raise _CandidateError(f"truncated transfer: got {received} of {total} bytes")


def _fetch_candidate(source: str, name: str, target: Path, timeout: float, progress: bool) -> None:
    """Copy or download ``<source>/<name>.zip`` to ``target``."""
    if _is_url(source):
        _download(_archive_url(source, name), target, timeout, progress)
        return
    directory = Path(source)  # a relative path resolves against the current directory
    if not directory.is_dir():
        raise _CandidateError("no such directory")
    candidate = directory / f"{name}.zip"
    if not candidate.is_file():
        raise _CandidateError(f"no {name}.zip in the directory")
    try:
        shutil.copyfile(candidate, target)
    except OSError as error:
        raise _CandidateError(f"cannot copy ({error})") from error


def _install_candidate(
    source: str,
    name: str,
    counts: ArchiveCounts,
    destination: Path,
    timeout: float,
    progress: bool,
) -> ArchiveSummary:
    """Fetch one candidate into a temporary file, verify it, rename it into place.

    The temporary file is removed whatever happens (including KeyboardInterrupt). The
    archive gets the permissions of an ordinary new file, not mkstemp's owner-only ones.
    """
    final_path = destination / f"{name}.zip"
    with atomic_path(final_path, suffix=".part", umask_permissions=True) as temporary:
        _fetch_candidate(source, name, temporary, timeout, progress)
        try:
            verified = verify_archive(temporary, name, counts)
        except ArchiveError as error:
            # The message names the temporary file; the caller names the source instead.
            reason = str(error).replace(f"{temporary}: ", "").replace("\n", " ")
            raise _CandidateError(f"invalid archive: {reason}") from error
    return dataclasses.replace(verified, path=final_path, source=source)


def fetch_archives(
    sources: list[str],
    destination: Path,
    expected: Mapping[str, ArchiveCounts] = OFFICIAL_COUNTS,
    timeout: float = 10.0,
    progress: bool = True,
) -> dict[str, ArchiveSummary]:
    """Put a verified ``<name>.zip`` for every name in ``expected`` into ``destination``.

    Each source is a local directory holding ``<name>.zip`` (a relative path is taken
    relative to the current working directory; a missing directory is skipped) or an
    ``http://``/``https://`` base URL to which ``<name>.zip`` is appended, e.g.
    OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/".
    Sources are tried in order; each candidate is written to a temporary file in
    ``destination``, verified with ``verify_archive``, then renamed onto
    ``destination/<name>.zip``, so an interrupted run never leaves a partial file at the
    final path. A failing candidate's temporary file is removed and the next source is
    tried. Passing ``destination`` itself as the first source reuses an archive already
    there. Returns the summaries by name, with ``source`` set to the source used.
    Raises ``DownloadError`` (message: every source tried and why it failed, one line each;
    ``failures``: the same as data) if some archive could not be obtained; archives that
    were obtained stay installed.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, ArchiveSummary] = {}
    failures: dict[str, list[tuple[str, str]]] = {}
    for name, counts in expected.items():
        attempts: list[tuple[str, str]] = []
        for source in sources:
            location = _describe(source, name)
            logger.info("fetching %s", location)
            try:
                summary = _install_candidate(source, name, counts, destination, timeout, progress)
                summaries[name] = dataclasses.replace(summary, rejected=tuple(attempts))
                break
            except _CandidateError as error:
                logger.warning("%s: %s", location, error)
                attempts.append((location, str(error)))
        else:
            failures[name] = attempts
    if failures:
        lines = []
        for name, attempts in failures.items():
            lines.append(f"could not fetch {name}.zip; tried {len(attempts)} source(s):")
            lines.extend(f"  - {location}: {reason}" for location, reason in attempts)
        raise DownloadError("\n".join(lines), failures)
    return summaries
