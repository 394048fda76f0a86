"""Verify Omniglot image archives: zip layout, counts, member integrity and sha256.

The official archives are ``images_background.zip`` and ``images_evaluation.zip`` from
OFFICIAL_URL. Each holds one top folder named like the archive, one folder per alphabet,
one ``characterNN`` folder per character and one ``NNNN_DD.png`` per drawing (NNNN: global
character id, DD: drawer), e.g.
``images_background/Alphabet_of_the_Magi/character01/0709_01.png``.

Fetching lives in ``metalab.data.download``; decoding in ``metalab.data.prefetch``. This
module needs neither, nor torch.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from metalab.errors import MetalabError

OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ARCHIVE_NAMES = ("images_background", "images_evaluation")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHARACTER_FOLDER = re.compile(r"character(\d+)")
_DRAWING_FILE = re.compile(r"(\d+)_(\d+)\.png")
_CHUNK_BYTES = 1 << 20


class ArchiveCounts(BaseModel):
    """How many alphabets, characters and drawings (PNG files) an archive must hold.

    Also the schema of ``data.expected`` in params.yaml.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alphabets: int = Field(ge=1)
    characters: int = Field(ge=1)
    drawings: int = Field(ge=1, description="PNG files in the archive")


OFFICIAL_COUNTS = {
    "images_background": ArchiveCounts(alphabets=30, characters=964, drawings=19280),
    "images_evaluation": ArchiveCounts(alphabets=20, characters=659, drawings=13180),
}


class ArchiveError(MetalabError):
    """An archive is unreadable, corrupted or not laid out / counted as expected."""


@dataclass(frozen=True)
class ArchiveSummary:
    """A verified archive.

    ``source`` is the entry of ``fetch_archives``'s ``sources`` it was fetched from (None
    if not fetched); ``rejected`` lists the (location, reason) of the sources tried before
    it that failed.
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


def _check_counts(layout: ArchiveLayout, expected: ArchiveCounts, label: Path) -> None:
    # A plain tuple, not ArchiveCounts: a damaged archive may hold 0 of something.
    found = (len(layout.alphabets), len(layout.characters), layout.num_drawings)
    if found != (expected.alphabets, expected.characters, expected.drawings):
        raise ArchiveError(
            f"{label}: expected {expected.alphabets} alphabets / {expected.characters} "
            f"characters / {expected.drawings} drawings in '{layout.name}', found "
            f"{found[0]} / {found[1]} / {found[2]}"
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
    """Hex SHA-256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, name: str, expected: ArchiveCounts) -> ArchiveSummary:
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
