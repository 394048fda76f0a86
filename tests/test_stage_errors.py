"""Bad input files end a stage with one line naming the file (exit 1), and temporaries a
killed stage left are cleaned by the next successful run."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import yaml
from omniglot_fixture import drawing_members
from PIL import Image

from metalab.data.download import fetch_archives
from metalab.io import atomic_output, remove_orphaned_temporaries

ROOT = Path(__file__).resolve().parents[1]


def undecodable_png() -> bytes:
    """A PNG whose chunks all carry valid CRCs but whose image data does not inflate."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((105, 105), np.uint8)).convert("1").save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    start = png.find(b"IDAT")
    length = struct.unpack(">I", png[start - 4 : start])[0]
    data = bytes([0x78, 0x9C]) + b"\xff" * (length - 2)
    png[start + 4 : start + 4 + length] = data
    png[start + 4 + length : start + 8 + length] = struct.pack(
        ">I", zlib.crc32(b"IDAT" + data) & 0xFFFFFFFF
    )
    return bytes(png)


def replace_member(archive: Path, member: str, content: bytes) -> None:
    """Rewrite `archive` with `member`'s bytes replaced (the zip's own CRC stays valid)."""
    with zipfile.ZipFile(archive) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(archive, "w") as target:
        for info, data in entries:
            target.writestr(info, content if info.filename == member else data)


def test_prefetch_stage_names_an_undecodable_drawing_in_one_line(tmp_path, tiny_omniglot_dir):
    project = tmp_path / "project"
    raw = project / "data" / "raw"
    shutil.copytree(tiny_omniglot_dir, raw)
    member = drawing_members(raw / "images_background.zip")[3]
    replace_member(raw / "images_background.zip", member, undecodable_png())
    (project / "params.yaml").write_text(
        yaml.safe_dump({"tracking": {"enabled": False}, "data": {"prefetch_workers": 1}})
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prefetch.py"), "--no-progress"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and member in lines[0] and lines[0].startswith("error: "), lines
    assert not (project / "data" / "prefetched" / "omniglot.npz").exists()


def test_a_later_download_removes_the_part_file_a_killed_one_left(
    tmp_path, tiny_omniglot_dir, tiny_expected_counts
):
    destination = tmp_path / "raw"
    destination.mkdir()
    orphan = destination / ".images_background.zip.k1ll3d.part"
    orphan.write_bytes(b"half an archive")
    fetch_archives([str(tiny_omniglot_dir)], destination, tiny_expected_counts, progress=False)
    assert not orphan.exists()
    assert sorted(p.name for p in destination.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]


def test_atomic_writes_clean_only_their_own_orphans(tmp_path):
    target = tmp_path / "metrics.json"
    own = tmp_path / ".metrics.json.abc.tmp"
    other = tmp_path / ".metrics.json5.abc.tmp"  # another file's temporary
    kept = tmp_path / ".metrics.json.abc.part"  # another suffix: another kind of writer
    for path in (own, other, kept):
        path.write_text("x")
    with atomic_output(target) as handle:
        handle.write(b"{}")
    assert target.read_text() == "{}"
    assert not own.exists() and other.exists() and kept.exists()
    assert remove_orphaned_temporaries(target, ".part") == [kept]
