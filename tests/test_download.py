"""verify_archive and fetch_archives on tiny archives in the official Omniglot layout, and the
atomic file helpers they rely on."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omniglot_fixture import corrupt_member, drawing_members, remove_entries, truncate_archive
from pydantic import ValidationError

import metalab.data.download as download
from metalab.data.archives import (
    ARCHIVE_NAMES,
    OFFICIAL_COUNTS,
    OFFICIAL_URL,
    ArchiveCounts,
    ArchiveError,
    verify_archive,
)
from metalab.data.download import DownloadError, fetch_archives
from metalab.io import atomic_output, atomic_path

BACKGROUND = "images_background"


@pytest.fixture
def mirror(tmp_path: Path, tiny_omniglot_dir: Path) -> Path:
    """A private, modifiable copy of the tiny archives."""
    return Path(shutil.copytree(tiny_omniglot_dir, tmp_path / "mirror"))


@pytest.fixture
def corrupt_mirror(tmp_path: Path, tiny_omniglot_dir: Path) -> Path:
    """A copy of the tiny archives in which one drawing of each archive fails its CRC."""
    directory = Path(shutil.copytree(tiny_omniglot_dir, tmp_path / "corrupt_mirror"))
    for name in ARCHIVE_NAMES:
        corrupt_member(directory / f"{name}.zip")
    return directory


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_mirror(tiny_omniglot_dir: Path) -> Iterator[str]:
    """Base URL of a loopback HTTP server serving the tiny archives."""
    handler = partial(_QuietHandler, directory=str(tiny_omniglot_dir))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def new_file_mode() -> int:
    """Permissions of a file created by plain open() here, i.e. under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# verify_archive ---------------------------------------------------------------------


def test_verify_accepts_good_archives_and_reports_counts(tiny_omniglot_dir, tiny_expected_counts):
    for name in ARCHIVE_NAMES:
        path = tiny_omniglot_dir / f"{name}.zip"
        summary = verify_archive(path, name, tiny_expected_counts[name])
        counts = tiny_expected_counts[name]
        assert (summary.alphabets, summary.characters, summary.drawings) == (
            counts.alphabets,
            counts.characters,
            counts.drawings,
        )
        assert summary.name == name and summary.path == path
        assert summary.sha256 == sha256(path)
        assert summary.size_bytes == path.stat().st_size


def test_verify_rejects_wrong_expected_counts_with_expected_and_found(tiny_omniglot_dir):
    path = tiny_omniglot_dir / f"{BACKGROUND}.zip"
    with pytest.raises(ArchiveError) as raised:
        verify_archive(path, BACKGROUND, OFFICIAL_COUNTS[BACKGROUND])
    message = str(raised.value)
    assert str(path) in message
    assert "expected 30 alphabets / 964 characters / 19280 drawings" in message
    assert "found 4 / 20 / 400" in message


def test_verify_rejects_truncated_archive(mirror, tiny_expected_counts):
    path = mirror / f"{BACKGROUND}.zip"
    truncate_archive(path, keep_fraction=0.6)
    with pytest.raises(ArchiveError, match="not a zip or truncated") as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    assert str(path) in str(raised.value)


def test_verify_rejects_a_file_that_is_not_a_zip(tmp_path, tiny_expected_counts):
    path = tmp_path / f"{BACKGROUND}.zip"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(ArchiveError, match="not a zip") as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    assert str(path) in str(raised.value)


def test_verify_rejects_missing_file(tmp_path, tiny_expected_counts):
    path = tmp_path / f"{BACKGROUND}.zip"
    with pytest.raises(ArchiveError, match="no such file"):
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])


def test_verify_rejects_crc_failure_naming_the_member(mirror, tiny_expected_counts):
    path = mirror / f"{BACKGROUND}.zip"
    member = corrupt_member(path)
    with zipfile.ZipFile(path) as archive:  # the corruption is in the data, not the structure
        assert archive.testzip() == member
    with pytest.raises(ArchiveError) as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    message = str(raised.value)
    assert str(path) in message and member in message and "CRC" in message


def test_verify_rejects_a_removed_character_folder_with_expected_vs_found(
    mirror, tiny_expected_counts
):
    path = mirror / f"{BACKGROUND}.zip"
    removed = remove_entries(path, f"{BACKGROUND}/Background_Script_02/character03/")
    assert removed == 21  # the folder entry and its 20 drawings
    with pytest.raises(ArchiveError) as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    message = str(raised.value)
    assert str(path) in message
    assert "expected 4 alphabets / 20 characters / 400 drawings" in message
    assert "found 4 / 19 / 380" in message


def test_verify_rejects_characters_with_unequal_numbers_of_drawings(mirror):
    path = mirror / f"{BACKGROUND}.zip"
    remove_entries(path, f"{BACKGROUND}/Background_Script_01/character02/")
    last_drawing = drawing_members(path)[-1]
    remove_entries(path, last_drawing)
    counts_as_found = ArchiveCounts(alphabets=4, characters=19, drawings=379)
    with pytest.raises(ArchiveError, match="same number of drawings") as raised:
        verify_archive(path, BACKGROUND, counts_as_found)
    assert last_drawing.rsplit("/", 2)[0].split("/", 1)[1] in str(raised.value)


def test_verify_rejects_wrong_top_folder(tiny_omniglot_dir, tiny_expected_counts):
    # the evaluation zip offered as the background archive
    path = tiny_omniglot_dir / "images_evaluation.zip"
    with pytest.raises(ArchiveError, match="top folder 'images_background/'") as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    "stray_entry",
    [
        f"{BACKGROUND}/Background_Script_01/character01/notes.txt",
        f"{BACKGROUND}/Background_Script_01/glyph01/0001_01.png",
        f"{BACKGROUND}/Background_Script_01/character01/extra/0001_01.png",
        f"{BACKGROUND}/Background_Script_01/0001_01.png",
    ],
)
def test_verify_rejects_entries_outside_the_layout(mirror, tiny_expected_counts, stray_entry):
    path = mirror / f"{BACKGROUND}.zip"
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(stray_entry, b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ArchiveError, match="expected entries of the form") as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    assert stray_entry in str(raised.value) and str(path) in str(raised.value)


def test_verify_rejects_a_drawing_that_is_not_a_png(mirror, tiny_expected_counts):
    path = mirror / f"{BACKGROUND}.zip"
    member = drawing_members(path)[0]
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, b"GIF89a not a png" if info.filename == member else data)
    with pytest.raises(ArchiveError, match="expected a PNG file") as raised:
        verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND])
    assert member in str(raised.value)


def test_verify_ignores_macos_metadata_entries(mirror, tiny_expected_counts):
    path = mirror / f"{BACKGROUND}.zip"
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"__MACOSX/{BACKGROUND}/._Background_Script_01", b"resource fork")
        archive.writestr(f"{BACKGROUND}/Background_Script_01/.DS_Store", b"finder")
    assert verify_archive(path, BACKGROUND, tiny_expected_counts[BACKGROUND]).drawings == 400


# fetch_archives ----------------------------------------------------------------------


def test_fetch_falls_back_from_missing_directory_and_corrupt_mirror(
    tmp_path, tiny_omniglot_dir, corrupt_mirror, tiny_expected_counts
):
    destination = tmp_path / "raw"
    missing = tmp_path / "no-such-mirror"
    sources = [str(missing), str(corrupt_mirror), str(tiny_omniglot_dir)]
    summaries = fetch_archives(sources, destination, tiny_expected_counts, progress=False)
    assert files_in(destination) == ["images_background.zip", "images_evaluation.zip"]
    for name in ARCHIVE_NAMES:
        summary = summaries[name]
        assert summary.source == str(tiny_omniglot_dir)
        assert summary.path == destination / f"{name}.zip"
        assert summary.sha256 == sha256(tiny_omniglot_dir / f"{name}.zip")
        assert summary.drawings == tiny_expected_counts[name].drawings
        (missing_reason, corrupt_reason) = [reason for _, reason in summary.rejected]
        assert missing_reason == "no such directory"
        assert "CRC" in corrupt_reason
        assert summary.rejected[1][0] == str(corrupt_mirror / f"{name}.zip")


def test_fetch_takes_relative_directories_from_the_working_directory(
    tmp_path, mirror, tiny_expected_counts, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    summaries = fetch_archives(["mirror"], Path("raw"), tiny_expected_counts, progress=False)
    assert {summary.source for summary in summaries.values()} == {"mirror"}
    assert files_in(tmp_path / "raw") == ["images_background.zip", "images_evaluation.zip"]


def test_fetch_reports_a_directory_without_the_archive(tmp_path, tiny_expected_counts):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DownloadError) as raised:
        fetch_archives([str(empty)], tmp_path / "raw", tiny_expected_counts, progress=False)
    assert raised.value.failures[BACKGROUND] == [
        (str(empty / f"{BACKGROUND}.zip"), f"no {BACKGROUND}.zip in the directory")
    ]


def test_fetch_over_http(tmp_path, http_mirror, tiny_omniglot_dir, tiny_expected_counts):
    destination = tmp_path / "raw"
    summaries = fetch_archives([http_mirror], destination, tiny_expected_counts, progress=True)
    for name in ARCHIVE_NAMES:
        assert summaries[name].source == http_mirror
        assert summaries[name].rejected == ()
        assert sha256(destination / f"{name}.zip") == sha256(tiny_omniglot_dir / f"{name}.zip")
    assert files_in(destination) == ["images_background.zip", "images_evaluation.zip"]


def test_fetch_records_http_404(tmp_path, http_mirror, tiny_omniglot_dir, tiny_expected_counts):
    missing_path = http_mirror + "no/such/path/"
    sources = [missing_path, str(tiny_omniglot_dir)]
    summaries = fetch_archives(sources, tmp_path / "raw", tiny_expected_counts, progress=False)
    assert summaries[BACKGROUND].rejected == (
        (missing_path + f"{BACKGROUND}.zip", "HTTP 404 File not found"),  # http.server wording
    )


def test_fetch_from_an_unreachable_url_records_the_reason_and_falls_back(
    tmp_path, closed_port_url, tiny_omniglot_dir, tiny_expected_counts
):
    sources = [closed_port_url, str(tiny_omniglot_dir)]
    summaries = fetch_archives(
        sources, tmp_path / "raw", tiny_expected_counts, timeout=5.0, progress=False
    )
    for name in ARCHIVE_NAMES:
        ((location, reason),) = summaries[name].rejected
        assert location == f"{closed_port_url}{name}.zip"
        assert reason.startswith("cannot connect") and "refused" in reason
        assert summaries[name].source == str(tiny_omniglot_dir)


def test_download_error_lists_every_source_and_leaves_no_files(
    tmp_path, corrupt_mirror, closed_port_url, tiny_expected_counts
):
    destination = tmp_path / "raw"
    missing = tmp_path / "no-such-mirror"
    sources = [str(missing), str(corrupt_mirror), closed_port_url]
    with pytest.raises(DownloadError) as raised:
        fetch_archives(sources, destination, tiny_expected_counts, timeout=5.0, progress=False)
    lines = str(raised.value).splitlines()
    for name in ARCHIVE_NAMES:
        header = lines.index(f"could not fetch {name}.zip; tried 3 source(s):")
        tried = lines[header + 1 : header + 4]
        assert tried[0] == f"  - {missing / f'{name}.zip'}: no such directory"
        assert tried[1].startswith(f"  - {corrupt_mirror / f'{name}.zip'}: invalid archive:")
        assert "CRC" in tried[1]
        assert tried[2].startswith(f"  - {closed_port_url}{name}.zip: cannot connect")
        assert [location for location, _ in raised.value.failures[name]] == [
            str(missing / f"{name}.zip"),
            str(corrupt_mirror / f"{name}.zip"),
            f"{closed_port_url}{name}.zip",
        ]
    assert len(lines) == 8  # a header and three sources per archive, nothing else
    assert files_in(destination) == []  # no final archive and no temporary file


def test_fetch_keeps_the_archives_it_got_when_another_fails(tmp_path, mirror, tiny_expected_counts):
    (mirror / "images_evaluation.zip").unlink()
    destination = tmp_path / "raw"
    with pytest.raises(DownloadError) as raised:
        fetch_archives([str(mirror)], destination, tiny_expected_counts, progress=False)
    assert set(raised.value.failures) == {"images_evaluation"}
    assert files_in(destination) == ["images_background.zip"]


def test_an_interrupted_fetch_leaves_neither_a_partial_archive_nor_a_temporary_file(
    tmp_path, tiny_omniglot_dir, tiny_expected_counts, monkeypatch
):
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "verify_archive", interrupted)
    destination = tmp_path / "raw"
    with pytest.raises(KeyboardInterrupt):
        fetch_archives([str(tiny_omniglot_dir)], destination, tiny_expected_counts, progress=False)
    assert files_in(destination) == []


def test_a_failed_fetch_does_not_touch_an_existing_archive(
    tmp_path, tiny_omniglot_dir, corrupt_mirror, tiny_expected_counts
):
    destination = tmp_path / "raw"
    destination.mkdir()
    existing = destination / f"{BACKGROUND}.zip"
    shutil.copy(tiny_omniglot_dir / f"{BACKGROUND}.zip", existing)
    before = sha256(existing)
    with pytest.raises(DownloadError):
        fetch_archives([str(corrupt_mirror)], destination, tiny_expected_counts, progress=False)
    assert sha256(existing) == before
    assert files_in(destination) == [f"{BACKGROUND}.zip"]


def test_fetched_archives_get_ordinary_file_permissions(
    tmp_path, tiny_omniglot_dir, tiny_expected_counts
):
    destination = tmp_path / "raw"
    fetch_archives([str(tiny_omniglot_dir)], destination, tiny_expected_counts, progress=False)
    for name in ARCHIVE_NAMES:  # not the owner-only 0600 of the temporary file
        assert (destination / f"{name}.zip").stat().st_mode & 0o777 == new_file_mode()


# ArchiveCounts and the official constants --------------------------------------------


def test_official_counts_and_url():
    assert OFFICIAL_URL == "https://github.com/brendenlake/omniglot/raw/master/python/"
    assert download.OFFICIAL_COUNTS is OFFICIAL_COUNTS  # fetch_archives' default
    assert OFFICIAL_COUNTS == {
        "images_background": ArchiveCounts(alphabets=30, characters=964, drawings=19280),
        "images_evaluation": ArchiveCounts(alphabets=20, characters=659, drawings=13180),
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"alphabets": 1, "characters": 1, "drawings": 0},
        {"alphabets": 1, "characters": 1},
        {"alphabets": 1, "characters": 1, "drawings": 1, "pngs": 1},
    ],
)
def test_archive_counts_rejects_non_positive_missing_and_unknown_fields(fields):
    with pytest.raises(ValidationError):
        ArchiveCounts(**fields)


def test_archive_counts_are_immutable():
    counts = ArchiveCounts(alphabets=1, characters=2, drawings=3)
    with pytest.raises(ValidationError):
        counts.drawings = 4


def test_verify_reports_zero_found_counts(tmp_path):
    path = tmp_path / f"{BACKGROUND}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{BACKGROUND}/", b"")
    with pytest.raises(ArchiveError, match="found 0 / 0 / 0"):
        verify_archive(path, BACKGROUND, ArchiveCounts(alphabets=1, characters=1, drawings=1))


# import layering ---------------------------------------------------------------------


def test_the_download_modules_do_not_import_torch_or_learners():
    # The download stage must start fast: no torch, no model / algorithm / RL code.
    script = (
        "import sys, metalab.data.archives, metalab.data.download, metalab.io\n"
        "heavy = ('torch', 'metalab.models', 'metalab.algorithms', 'metalab.rl')\n"
        "print(sorted(name for name in sys.modules if name.startswith(heavy)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# atomic_path / atomic_output ---------------------------------------------------------


def test_atomic_path_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out" / "archive.zip"
    with atomic_path(target, suffix=".part") as temporary:
        assert temporary.parent == target.parent and temporary.name.endswith(".part")
        assert temporary.exists() and not target.exists()
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert files_in(target.parent) == ["archive.zip"]
    assert target.stat().st_mode & 0o777 == 0o600  # mkstemp's mode unless asked otherwise


@pytest.mark.parametrize("failure", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("helper", ["atomic_path", "atomic_output"])
def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, failure, helper):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")
    with pytest.raises(failure):
        if helper == "atomic_path":
            with atomic_path(target) as temporary:
                temporary.write_bytes(b"half")
                raise failure
        else:
            with atomic_output(target) as handle:
                handle.write(b"half")
                raise failure
    assert target.read_bytes() == b"old"
    assert files_in(tmp_path) == ["metrics.json"]


def test_a_failed_atomic_write_creates_no_file(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(ValueError), atomic_output(target) as handle:
        handle.write(b"half")
        raise ValueError
    assert files_in(tmp_path) == []


def test_atomic_output_with_umask_permissions(tmp_path):
    target = tmp_path / "data.npz"
    with atomic_output(target, umask_permissions=True) as handle:
        handle.write(b"payload")
    assert target.read_bytes() == b"payload"
    assert target.stat().st_mode & 0o777 == new_file_mode()
