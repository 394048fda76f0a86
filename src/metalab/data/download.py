"""Fetch and verify the two Omniglot image archives.

The official archives are ``images_background.zip`` and ``images_evaluation.zip`` from
``https://github.com/brendenlake/omniglot/raw/master/python/`` (OFFICIAL_BASE_URL). Each
holds one top folder named like the archive, one folder per alphabet, one ``characterNN``
folder per character and one ``NNNN_DD.png`` per drawing (NNNN: global character id,
DD: drawer), e.g. ``images_background/Alphabet_of_the_Magi/character01/0709_01.png``.

``fetch_archives`` tries a list of sources (local directories or http(s) base URLs) in
order for each archive; every candidate lands in a temporary file next to its final path,
is verified with ``verify_archive`` and only then renamed onto ``<destination>/<name>.zip``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ARCHIVE_NAMES = ("images_background", "images_evaluation")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHARACTER_FOLDER = re.compile(r"character(\d+)")
_DRAWING_FILE = re.compile(r"(\d+)_(\d+)\.png")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ExpectedCounts:
    """How many alphabets, characters and drawings (PNG files) an archive must hold."""

    alphabets: int
    characters: int
    drawings: int


OFFICIAL_COUNTS = {
    "images_background": ExpectedCounts(alphabets=30, characters=964, drawings=19280),
    "images_evaluation": ExpectedCounts(alphabets=20, characters=659, drawings=13180),
}


class ArchiveError(Exception):
    """An archive is unreadable, corrupted or not laid out / counted as expected."""


class DownloadError(Exception):
    """No source yielded a valid archive; ``failures`` maps archive name to (source, reason)."""

    def __init__(
        self, message: str, failures: dict[str, list[tuple[str, str]]] | None = None
    ) -> None:
        super().__init__(message)
        self.failures = failures or {}


@dataclass(frozen=True)
class ArchiveSummary:
    """A verified archive.

    ``source`` is the entry of ``sources`` it was fetched from (None if not fetched);
    ``rejected`` lists the (location, reason) of the sources tried before it that failed.
    """

    name: str
    path: Path
    sha256: str
    size_bytes: int
    alphabets: int
    characters: int
    drawings: int
    source: str | None = None
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Drawing:
    """One PNG member: ``character_id`` is the file name's NNNN, ``drawer`` its DD."""

    member: str
    character_id: int
    drawer: int


@dataclass(frozen=True)
class CharacterFolder:
    """A ``<alphabet>/characterNN`` folder and its drawings, sorted by drawer."""

    alphabet: str
    folder: str
    number: int
    drawings: tuple[Drawing, ...]

    @property
    def name(self) -> str:
        return f"{self.alphabet}/{self.folder}"


@dataclass(frozen=True)
class ArchiveLayout:
    """The drawings of one archive, characters sorted by alphabet name then number."""

    name: str
    alphabets: tuple[str, ...]
    characters: tuple[CharacterFolder, ...]

    @property
    def num_drawings(self) -> int:
        return sum(len(character.drawings) for character in self.characters)


def _is_platform_clutter(member: str) -> bool:
    # Zips made with macOS Finder carry resource forks and .DS_Store files; they hold
    # no images, so they are ignored rather than rejected.
    return member.startswith("__MACOSX/") or member.rsplit("/", 1)[-1] == ".DS_Store"


def _entry_is_valid(parts: list[str], is_directory: bool) -> bool:
    """Whether split member ``parts`` (top folder already checked) fit the official layout."""
    folders = parts[1:-1]  # the last part is "" for a directory, the file name otherwise
    if not all(folders) or len(folders) > 2:
        return False
    if len(folders) == 2 and _CHARACTER_FOLDER.fullmatch(folders[1]) is None:
        return False
    if is_directory:
        return True
    return len(folders) == 2 and _DRAWING_FILE.fullmatch(parts[-1]) is not None


def read_layout(archive: zipfile.ZipFile, name: str, label: str | Path) -> ArchiveLayout:
    """Parse the member names of ``archive`` into its alphabet/character/drawing layout.

    Checks the names only (not the bytes): every entry must be ``<name>/``,
    ``<name>/<alphabet>/``, ``<name>/<alphabet>/character<digits>/`` or a drawing
    ``<name>/<alphabet>/character<digits>/<digits>_<digits>.png``. All drawings of a
    character share one character id, drawers are unique within a character and character
    ids are unique within the archive. Folders without drawings still count (a character
    folder with no drawings is a character with 0 drawings). ``label`` names the file in
    errors, which are ``ArchiveError``.
    """
    alphabets: set[str] = set()
    drawings: dict[tuple[str, str], list[Drawing]] = {}
    for member in archive.namelist():
        if _is_platform_clutter(member):
            continue
        parts = member.split("/")
        if parts[0] != name or len(parts) == 1:
            raise ArchiveError(
                f"{label}: expected every entry under the top folder '{name}/', "
                f"found entry '{member}'"
            )
        if not _entry_is_valid(parts, member.endswith("/")):
            raise ArchiveError(
                f"{label}: expected entries of the form "
                f"'{name}/<alphabet>/character<NN>/<NNNN>_<DD>.png', found entry '{member}'"
            )
        if len(parts) >= 3:
            alphabets.add(parts[1])
        if len(parts) == 4:
            folder_drawings = drawings.setdefault((parts[1], parts[2]), [])
            file_match = _DRAWING_FILE.fullmatch(parts[3])
            if file_match is not None:  # None for the folder entry itself
                character_id, drawer = (int(group) for group in file_match.groups())
                folder_drawings.append(Drawing(member, character_id, drawer))

    characters = []
    folder_of_id: dict[int, str] = {}
    for (alphabet, folder), folder_drawings in drawings.items():
        folder_name = f"{alphabet}/{folder}"
        ids = sorted({drawing.character_id for drawing in folder_drawings})
        if len(ids) > 1:
            raise ArchiveError(
                f"{label}: expected one character id per character folder, "
                f"found ids {ids} in '{folder_name}'"
            )
        for character_id in ids:
            if character_id in folder_of_id:
                raise ArchiveError(
                    f"{label}: expected unique character ids, found id {character_id:04d} "
                    f"in both '{folder_of_id[character_id]}' and '{folder_name}'"
                )
            folder_of_id[character_id] = folder_name
        drawer_counts = Counter(drawing.drawer for drawing in folder_drawings)
        repeated = sorted(drawer for drawer, count in drawer_counts.items() if count > 1)
        if repeated:
            raise ArchiveError(
                f"{label}: expected each drawer once per character, found drawer(s) "
                f"{repeated} repeated in '{folder_name}'"
            )
        characters.append(
            CharacterFolder(
                alphabet=alphabet,
                folder=folder,
                number=int(folder.removeprefix("character")),
                drawings=tuple(sorted(folder_drawings, key=lambda d: d.drawer)),
            )
        )
    characters.sort(key=lambda c: (c.alphabet, c.number, c.folder))
    return ArchiveLayout(
        name=name, alphabets=tuple(sorted(alphabets)), characters=tuple(characters)
    )


def _check_counts(layout: ArchiveLayout, expected: ExpectedCounts, label: Path) -> None:
    found = ExpectedCounts(len(layout.alphabets), len(layout.characters), layout.num_drawings)
    if found != expected:
        raise ArchiveError(
            f"{label}: expected {expected.alphabets} alphabets / {expected.characters} "
            f"characters / {expected.drawings} drawings in '{layout.name}', found "
            f"{found.alphabets} / {found.characters} / {found.drawings}"
        )
    sizes = Counter(len(character.drawings) for character in layout.characters)
    if len(sizes) > 1:
        usual = sizes.most_common(1)[0][0]
        odd = [c for c in layout.characters if len(c.drawings) != usual]
        raise ArchiveError(
            f"{label}: expected every character to have the same number of drawings "
            f"({usual}), found {len(odd)} character(s) that differ, e.g. '{odd[0].name}' "
            f"with {len(odd[0].drawings)}"
        )


def _check_members_intact(archive: zipfile.ZipFile, layout: ArchiveLayout, label: Path) -> None:
    """Read every drawing so its CRC-32 is checked, and check the PNG signature."""
    for character in layout.characters:
        for drawing in character.drawings:
            try:
                with archive.open(drawing.member) as member_file:
                    head = member_file.read(len(_PNG_SIGNATURE))
                    while member_file.read(_CHUNK_BYTES):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise ArchiveError(
                    f"{label}: member '{drawing.member}' is corrupted ({error})"
                ) from error
            except (NotImplementedError, RuntimeError) as error:
                raise ArchiveError(
                    f"{label}: member '{drawing.member}' cannot be read ({error})"
                ) from error
            if head != _PNG_SIGNATURE:
                raise ArchiveError(
                    f"{label}: expected a PNG file, member '{drawing.member}' starts with {head!r}"
                )


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, name: str, expected: ExpectedCounts) -> ArchiveSummary:
    """Check that ``path`` is an intact Omniglot archive ``name`` with ``expected`` counts.

    Checks, in order: the file is a readable zip; the entry names follow the official
    layout (see ``read_layout``); the alphabet/character/drawing counts equal ``expected``
    and every character has the same number of drawings; every drawing's CRC-32 matches
    and it starts with the PNG signature. Raises ``ArchiveError`` naming the file and what
    was expected vs found. Takes about half a second on the 8.5 MB background archive.
    """
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: expected a zip archive '{name}.zip', found no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            layout = read_layout(archive, name, path)
            _check_counts(layout, expected, path)
            _check_members_intact(archive, layout, path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise ArchiveError(
            f"{path}: expected a zip archive '{name}.zip', found an unreadable file "
            f"(not a zip or truncated: {error})"
        ) from error
    return ArchiveSummary(
        name=name,
        path=path,
        sha256=sha256_of_file(path),
        size_bytes=path.stat().st_size,
        alphabets=len(layout.alphabets),
        characters=len(layout.characters),
        drawings=layout.num_drawings,
    )


def move_into_place(temporary: Path, final: Path) -> None:
    """Atomically rename ``temporary`` onto ``final`` (same file system).

    ``tempfile.mkstemp`` creates files readable by the owner only; the final file gets the
    permissions an ordinary new file would get under the current umask.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, final)


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
    counts: ExpectedCounts,
    destination: Path,
    timeout: float,
    progress: bool,
) -> ArchiveSummary:
    """Fetch one candidate into a temporary file, verify it, rename it into place.

    The temporary file is removed whatever happens (including KeyboardInterrupt).
    """
    descriptor, temporary_name = tempfile.mkstemp(
        prefix=f".{name}.", suffix=".zip.part", dir=destination
    )
    os.close(descriptor)
    temporary = Path(temporary_name)
    final_path = destination / f"{name}.zip"
    try:
        _fetch_candidate(source, name, temporary, timeout, progress)
        try:
            verified = verify_archive(temporary, name, counts)
        except ArchiveError as error:
            # The message names the temporary file; the caller names the source instead.
            reason = str(error).replace(f"{temporary}: ", "").replace("\n", " ")
            raise _CandidateError(f"invalid archive: {reason}") from error
        move_into_place(temporary, final_path)
    finally:
        temporary.unlink(missing_ok=True)
    return ArchiveSummary(
        name=name,
        path=final_path,
        sha256=verified.sha256,
        size_bytes=verified.size_bytes,
        alphabets=verified.alphabets,
        characters=verified.characters,
        drawings=verified.drawings,
        source=source,
    )


def fetch_archives(
    sources: list[str],
    destination: Path,
    expected: dict[str, ExpectedCounts] = OFFICIAL_COUNTS,
    timeout: float = 10.0,
    progress: bool = True,
) -> dict[str, ArchiveSummary]:
    """Put a verified ``<name>.zip`` for every name in ``expected`` into ``destination``.

    Each source is a local directory holding ``<name>.zip`` (a relative path is taken
    relative to the current working directory; a missing directory is skipped) or an
    ``http://``/``https://`` base URL to which ``<name>.zip`` is appended, e.g.
    OFFICIAL_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/".
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
