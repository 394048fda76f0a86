"""prefetch_omniglot / load_prefetched on tiny archives in the official Omniglot layout."""

import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omniglot_fixture import corrupt_member, make_omniglot_archives, remove_entries
from PIL import Image

import metalab.data.prefetch as prefetch
from metalab.data.archives import ARCHIVE_NAMES, ArchiveError
from metalab.data.prefetch import PrefetchError, load_prefetched, prefetch_omniglot

CHARACTERS = 4 * 5 + 3 * 4  # background then evaluation, as in conftest
DRAWINGS = 20
FILE_NAME = re.compile(r"(images_\w+)/(\w+/character\d+)/(\d{4})_(\d{2})\.png")


def archives_in(directory: Path) -> dict[str, Path]:
    return {name: directory / f"{name}.zip" for name in ARCHIVE_NAMES}


def drawings_by_name(directory: Path) -> dict[tuple[str, int], tuple[str, bytes]]:
    """(character folder, drawer) -> (archive name, PNG bytes) for every drawing."""
    drawings = {}
    for name, path in archives_in(directory).items():
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                match = FILE_NAME.fullmatch(member)
                if match:
                    drawings[(match.group(2), int(match.group(4)))] = (name, archive.read(member))
    return drawings


def reference_image(png: bytes, image_size: int) -> np.ndarray:
    """The documented preprocessing, written out independently of the module."""
    grey = Image.open(io.BytesIO(png)).convert("L")
    if image_size != 105:
        grey = grey.resize((image_size, image_size), Image.LANCZOS)
    return 255 - np.array(grey, dtype=np.int32)


@pytest.fixture(scope="module")
def prefetched_28(tiny_prefetched_28: Path) -> dict[str, np.ndarray]:
    with np.load(tiny_prefetched_28, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def test_prefetch_shapes_and_dtypes(prefetched_28):
    rows = CHARACTERS * DRAWINGS
    expected = {
        "images": ((rows, 28, 28), np.uint8),
        "character": ((rows,), np.int16),
        "drawer": ((rows,), np.int8),
        "alphabet": ((rows,), np.int16),
        "origin": ((rows,), np.uint8),
        "character_alphabet": ((CHARACTERS,), np.int16),
        "character_origin": ((CHARACTERS,), np.uint8),
        "drawings_per_character": ((), np.int64),
        "image_size": ((), np.int64),
    }
    assert set(prefetched_28) == set(expected) | {"alphabet_names", "character_names"}
    for key, (shape, dtype) in expected.items():
        assert prefetched_28[key].shape == shape, key
        assert prefetched_28[key].dtype == dtype, key
    assert prefetched_28["alphabet_names"].dtype.kind == "U"
    assert prefetched_28["character_names"].dtype.kind == "U"
    assert int(prefetched_28["drawings_per_character"]) == DRAWINGS
    assert int(prefetched_28["image_size"]) == 28


def test_prefetch_sort_order_and_names(prefetched_28):
    background = [f"Background_Script_{index:02d}" for index in range(1, 5)]
    evaluation = [f"Another_Script_{index:02d}" for index in range(1, 4)]
    # background first even though the evaluation names sort before them
    assert prefetched_28["alphabet_names"].tolist() == background + evaluation
    expected_names = [f"{a}/character{c:02d}" for a in background for c in range(1, 6)] + [
        f"{a}/character{c:02d}" for a in evaluation for c in range(1, 5)
    ]
    assert prefetched_28["character_names"].tolist() == expected_names
    assert prefetched_28["character_alphabet"].tolist() == [
        a for a in range(4) for _ in range(5)
    ] + [a for a in range(4, 7) for _ in range(4)]
    assert prefetched_28["character_origin"].tolist() == [0] * 20 + [1] * 12
    np.testing.assert_array_equal(
        prefetched_28["character"], np.repeat(np.arange(CHARACTERS), DRAWINGS)
    )
    np.testing.assert_array_equal(
        prefetched_28["drawer"], np.tile(np.arange(1, DRAWINGS + 1), CHARACTERS)
    )
    np.testing.assert_array_equal(
        prefetched_28["alphabet"], np.repeat(prefetched_28["character_alphabet"], DRAWINGS)
    )
    np.testing.assert_array_equal(prefetched_28["origin"], np.repeat([0, 1], [400, 240]))


def test_prefetch_rows_hold_the_drawing_named_by_character_and_drawer(
    prefetched_28, tiny_omniglot_dir
):
    drawings = drawings_by_name(tiny_omniglot_dir)
    assert len(drawings) == CHARACTERS * DRAWINGS
    names = prefetched_28["character_names"]
    for row in range(CHARACTERS * DRAWINGS):
        character = int(prefetched_28["character"][row])
        archive_name, png = drawings[(names[character], int(prefetched_28["drawer"][row]))]
        assert ARCHIVE_NAMES.index(archive_name) == prefetched_28["origin"][row]
        np.testing.assert_array_equal(prefetched_28["images"][row], reference_image(png, 28))


def test_prefetched_ink_is_bright_on_a_blank_background(prefetched_28):
    images = prefetched_28["images"]
    # the fixture draws strokes away from the borders, so corners are paper
    assert (images[:, 0, 0] == 0).all() and (images[:, -1, -1] == 0).all()
    assert (images.reshape(len(images), -1).max(axis=1) >= 200).all()  # every drawing has ink
    assert images.max() == 255
    assert images.mean() < 0.3 * 255  # mostly paper
    # anti-aliased edges from the Lanczos resize give intermediate grey levels
    assert len(np.unique(images)) > 50


def test_prefetch_at_105_keeps_pixels_exactly_with_a_worker_pool(tmp_path, tiny_omniglot_dir):
    output = tmp_path / "omniglot_105.npz"
    summary = prefetch_omniglot(
        archives_in(tiny_omniglot_dir), 105, output, workers=2, progress=False
    )
    assert (summary.images, summary.characters, summary.alphabets) == (640, 32, 7)
    assert summary.image_size == 105 and summary.output == output
    with np.load(output, allow_pickle=False) as npz:
        images, character, drawer = npz["images"], npz["character"], npz["drawer"]
        names = npz["character_names"]
    assert images.shape == (640, 105, 105)
    assert set(np.unique(images).tolist()) == {0, 255}
    drawings = drawings_by_name(tiny_omniglot_dir)
    for row in range(len(images)):
        _, png = drawings[(names[character[row]], int(drawer[row]))]
        ink = ~np.array(Image.open(io.BytesIO(png)))  # mode "1": True is paper
        np.testing.assert_array_equal(images[row], ink.astype(np.uint8) * 255)
    assert sorted(path.name for path in tmp_path.iterdir()) == [output.name]  # no temp file


def test_prefetch_requires_equal_drawings_per_character(tmp_path):
    paths = make_omniglot_archives(tmp_path / "raw", background=(2, 2), evaluation=(1, 2))
    remove_entries(paths["images_evaluation"], "images_evaluation/Another_Script_01/character02/")
    with zipfile.ZipFile(paths["images_evaluation"]) as archive:
        last = [m for m in archive.namelist() if m.endswith(".png")][-1]
    remove_entries(paths["images_evaluation"], last)
    output = tmp_path / "out.npz"
    with pytest.raises(PrefetchError, match="same number of drawings") as raised:
        prefetch_omniglot(paths, 28, output, workers=1, progress=False)
    assert "19" in str(raised.value) and "20" in str(raised.value)
    assert not output.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_prefetch_reports_a_corrupted_member(tmp_path, tiny_omniglot_dir, workers):
    directory = Path(shutil.copytree(tiny_omniglot_dir, tmp_path / "raw"))
    member = corrupt_member(directory / "images_background.zip")
    output = tmp_path / "out" / "omniglot.npz"
    with pytest.raises(ArchiveError, match=re.escape(member)):
        prefetch_omniglot(archives_in(directory), 28, output, workers=workers, progress=False)
    assert not output.exists()


def test_prefetch_rejects_unknown_archive_names(tmp_path, tiny_omniglot_dir):
    archives = {"images_background_small1": tiny_omniglot_dir / "images_background.zip"}
    with pytest.raises(PrefetchError, match="expected archives named"):
        prefetch_omniglot(archives, 28, tmp_path / "out.npz", workers=1, progress=False)


def test_load_prefetched_round_trip(tiny_prefetched_28, prefetched_28):
    loaded = load_prefetched(tiny_prefetched_28)
    assert loaded.images.dtype == torch.uint8 and loaded.images.shape == (640, 28, 28)
    assert torch.equal(loaded.images, torch.from_numpy(prefetched_28["images"]))
    for key in ("character", "drawer", "alphabet", "origin"):
        tensor = getattr(loaded, key)
        assert tensor.dtype == torch.long, key
        assert tensor.tolist() == prefetched_28[key].tolist(), key
    for key in ("character_alphabet", "character_origin"):
        assert getattr(loaded, key).tolist() == prefetched_28[key].tolist(), key
    assert loaded.alphabet_names == prefetched_28["alphabet_names"].tolist()
    assert loaded.character_names == prefetched_28["character_names"].tolist()
    assert all(type(name) is str for name in loaded.character_names)
    assert loaded.num_characters == CHARACTERS
    assert loaded.drawings_per_character == DRAWINGS and loaded.image_size == 28
    first_of_character_3 = loaded.images[3 * DRAWINGS : 4 * DRAWINGS]
    assert (loaded.character[3 * DRAWINGS : 4 * DRAWINGS] == 3).all()
    assert first_of_character_3.shape == (DRAWINGS, 28, 28)


def test_load_prefetched_names_a_missing_key(tmp_path, prefetched_28):
    path = tmp_path / "incomplete.npz"
    np.savez(path, **{key: value for key, value in prefetched_28.items() if key != "drawer"})
    with pytest.raises(PrefetchError) as raised:
        load_prefetched(path)
    assert str(path) in str(raised.value) and "'drawer'" in str(raised.value)


def test_load_prefetched_names_mismatched_arrays(tmp_path, prefetched_28):
    path = tmp_path / "mismatched.npz"
    arrays = dict(prefetched_28)
    arrays["origin"] = arrays["origin"][:-20]
    np.savez(path, **arrays)
    with pytest.raises(PrefetchError, match=r"'origin' has shape \(620,\), expected \(640,\)"):
        load_prefetched(path)
    arrays = dict(prefetched_28)
    arrays["character"] = arrays["character"].astype(np.int64)
    np.savez(path, **arrays)
    with pytest.raises(PrefetchError, match="'character' has dtype int64, expected int16"):
        load_prefetched(path)


def test_load_prefetched_missing_file(tmp_path):
    path = tmp_path / "nothing.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_prefetched(path)


def test_prefetched_file_gets_ordinary_permissions(tiny_prefetched_28):
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_prefetched_28.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary(
    tmp_path, tiny_omniglot_dir, monkeypatch
):
    output = tmp_path / "omniglot.npz"
    output.write_bytes(b"previous prefetch")

    def interrupted_savez(file: object, **arrays: object) -> None:
        file.write(b"half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(prefetch.np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        prefetch_omniglot(archives_in(tiny_omniglot_dir), 28, output, workers=1, progress=False)
    assert output.read_bytes() == b"previous prefetch"
    assert [path.name for path in tmp_path.iterdir()] == [output.name]


def test_prefetch_imports_archive_checks_but_not_the_downloader():
    script = (
        "import sys, metalab.data.prefetch\n"
        "print('metalab.data.archives' in sys.modules, 'metalab.data.download' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "False"]
