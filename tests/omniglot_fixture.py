"""Tiny Omniglot-like archives in exactly the official layout, and ways to damage them.

Each character is a fixed random set of pen strokes; each of its drawings redraws those
strokes with a small random shift and per-point jitter, so drawings of one character look
alike and different characters look different (learners can learn on them). The archives
mirror the official zips: top folder ``images_background``/``images_evaluation``, one
folder per alphabet, ``characterNN`` folders, ``NNNN_DD.png`` files (105x105, mode "1",
paper white) with global character ids continuing from background into evaluation,
ZIP_STORED, directory entries, sorted entry names and a fixed timestamp.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metalab.data.archives import ArchiveCounts

IMAGE_SIZE = 105
_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
# Evaluation alphabet names sort before background ones on purpose, so that code which
# sorts across archives instead of "background first" is caught by the tests.
_ALPHABET_PREFIX = {"images_background": "Background_Script", "images_evaluation": "Another_Script"}


def expected_counts(
    background: tuple[int, int] = (4, 5),
    evaluation: tuple[int, int] = (3, 4),
    drawings: int = 20,
) -> dict[str, ArchiveCounts]:
    """Counts of archives made by ``make_omniglot_archives`` with the same arguments."""
    return {
        name: ArchiveCounts(
            alphabets=alphabets,
            characters=alphabets * characters,
            drawings=alphabets * characters * drawings,
        )
        for name, (alphabets, characters) in (
            ("images_background", background),
            ("images_evaluation", evaluation),
        )
    }


def _character_strokes(rng: np.random.Generator) -> list[np.ndarray]:
    """2-4 polylines of 3-5 points each, inside the central part of the canvas."""
    return [
        rng.uniform(18, IMAGE_SIZE - 18, size=(int(rng.integers(3, 6)), 2))
        for _ in range(int(rng.integers(2, 5)))
    ]


def _draw(strokes: list[np.ndarray], rng: np.random.Generator) -> bytes:
    """One jittered drawing of ``strokes`` as PNG bytes (mode "1", ink 0 on paper 1)."""
    image = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 1)
    pen = ImageDraw.Draw(image)
    shift = rng.uniform(-4, 4, size=2)
    width = int(rng.integers(4, 7))
    for stroke in strokes:
        points = stroke + shift + rng.uniform(-2.5, 2.5, size=stroke.shape)
        pen.line([tuple(point) for point in points.tolist()], fill=0, width=width, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _directory_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_TIMESTAMP)
    info.external_attr = (0o40755 << 16) | 0x10  # a directory, as zip tools write it
    return info


def _file_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_TIMESTAMP)
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_STORED
    return info


def make_omniglot_archives(
    directory: Path,
    background: tuple[int, int] = (4, 5),
    evaluation: tuple[int, int] = (3, 4),
    drawings: int = 20,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``images_background.zip`` and ``images_evaluation.zip`` into ``directory``.

    ``background``/``evaluation`` are (alphabets, characters per alphabet). Character ids
    (the NNNN of ``NNNN_DD.png``) are handed out alphabet by alphabet in a shuffled
    alphabet order, as in the real data (where Alphabet_of_the_Magi starts at 0709), and
    continue from background into evaluation. Returns the paths by archive name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    next_id = 1
    paths = {}
    for name, (alphabets, characters) in (
        ("images_background", background),
        ("images_evaluation", evaluation),
    ):
        alphabet_names = [f"{_ALPHABET_PREFIX[name]}_{index + 1:02d}" for index in range(alphabets)]
        first_id = {}
        for alphabet in rng.permutation(alphabet_names).tolist():
            first_id[alphabet] = next_id
            next_id += characters
        entries: dict[str, bytes | None] = {f"{name}/": None}  # None marks a directory
        for alphabet in alphabet_names:
            entries[f"{name}/{alphabet}/"] = None
            for number in range(1, characters + 1):
                folder = f"{name}/{alphabet}/character{number:02d}/"
                entries[folder] = None
                strokes = _character_strokes(rng)
                character_id = first_id[alphabet] + number - 1
                for drawer in range(1, drawings + 1):
                    png = _draw(strokes, rng)
                    entries[f"{folder}{character_id:04d}_{drawer:02d}.png"] = png
        path = directory / f"{name}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for member in sorted(entries):
                data = entries[member]
                if data is None:
                    archive.writestr(_directory_info(member), b"")
                else:
                    archive.writestr(_file_info(member), data)
        paths[name] = path
    return paths


def drawing_members(archive: Path) -> list[str]:
    """The PNG members of ``archive``, in zip order."""
    with zipfile.ZipFile(archive) as opened:
        return [member for member in opened.namelist() if member.endswith(".png")]


def corrupt_member(archive: Path, member: str | None = None) -> str:
    """Flip bytes in the middle of ``member``'s stored data (default: the middle drawing),
    leaving the zip structure intact so that only its CRC-32 check fails. Returns the member.
    """
    archive = Path(archive)
    if member is None:
        members = drawing_members(archive)
        member = members[len(members) // 2]
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size < 16:
        raise ValueError(f"{member}: can only corrupt stored members of at least 16 bytes")
    with open(archive, "r+b") as file:
        file.seek(info.header_offset + 26)  # local header: name length, extra length
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        middle = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
        file.seek(middle)
        original = file.read(4)
        file.seek(middle)
        file.write(bytes(byte ^ 0xFF for byte in original))
    return member


def truncate_archive(archive: Path, keep_fraction: float = 0.5) -> int:
    """Cut ``archive`` to ``keep_fraction`` of its size (as an interrupted copy would).
    Returns the new size in bytes."""
    archive = Path(archive)
    size = int(archive.stat().st_size * keep_fraction)
    with open(archive, "r+b") as file:
        file.truncate(size)
    return size


def remove_entries(archive: Path, prefix: str) -> int:
    """Rewrite ``archive`` without the entries whose names start with ``prefix`` (e.g. a
    whole character folder). Returns how many entries were removed."""
    archive = Path(archive)
    with zipfile.ZipFile(archive) as opened:
        kept = [(info, opened.read(info)) for info in opened.infolist()]
    remaining = [(info, data) for info, data in kept if not info.filename.startswith(prefix)]
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as rewritten:
        for info, data in remaining:
            rewritten.writestr(info, data)
    return len(kept) - len(remaining)
