"""Decode every Omniglot drawing once into one uncompressed ``.npz`` of fixed-size images.

Preprocessing of each PNG (105x105, 1-bit): convert mode "1" to "L"; if ``image_size`` is
not 105, resize to ``image_size`` x ``image_size`` with ``Image.LANCZOS`` (the filter MAML's
``resize_images.py`` asks for; note that Pillow silently uses nearest-neighbour for mode
"1" images, so resizing after the conversion is what actually gives the Lanczos filter);
invert, so that ink is bright.

Layout of the ``.npz`` (N drawings, C characters, A alphabets, D drawings per character,
S = ``image_size``). Rows are sorted by global character index, then by drawer, so the
drawings of character c are rows ``c*D .. c*D + D - 1``:

  images                  uint8 [N, S, S]   0 = paper, 255 = full ink (``images / 255`` is the
                                            float image with ink = 1.0)
  character               int16 [N]         global character index 0..C-1
  drawer                  int8  [N]         the DD of the file name ``NNNN_DD.png`` (1..20)
  alphabet                int16 [N]         index into ``alphabet_names``
  origin                  uint8 [N]         0 = images_background, 1 = images_evaluation
  alphabet_names          str   [A]         e.g. "Alphabet_of_the_Magi"
  character_names         str   [C]         e.g. "Alphabet_of_the_Magi/character01"
  character_alphabet      int16 [C]         alphabet index of each character
  character_origin        uint8 [C]         origin of each character
  drawings_per_character  int64 []          D
  image_size              int64 []          S

Characters are numbered background first, then evaluation; within an archive by alphabet
name, then by the number of the ``characterNN`` folder. Alphabets are numbered in the same
order. All strings are numpy unicode arrays, so ``np.load(path, allow_pickle=False)`` works.
"""

from __future__ import annotations

import io
import multiprocessing
import time
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from metalab.data.archives import ARCHIVE_NAMES, ArchiveError, ArchiveLayout, read_layout
from metalab.errors import MetalabError
from metalab.io import atomic_output

if TYPE_CHECKING:
    import torch

ORIGINAL_IMAGE_SIZE = 105
_DRAWINGS_PER_TASK = 400  # enough work per task to hide the pool's per-task overhead

# Arrays in the file and the dtype each must have.
ARRAY_DTYPES = {
    "images": np.dtype(np.uint8),
    "character": np.dtype(np.int16),
    "drawer": np.dtype(np.int8),
    "alphabet": np.dtype(np.int16),
    "origin": np.dtype(np.uint8),
    "character_alphabet": np.dtype(np.int16),
    "character_origin": np.dtype(np.uint8),
    "drawings_per_character": np.dtype(np.int64),
    "image_size": np.dtype(np.int64),
}
STRING_ARRAYS = ("alphabet_names", "character_names")


class PrefetchError(MetalabError):
    """The archives cannot be prefetched, or a prefetched file is not in the expected format."""


@dataclass(frozen=True)
class PrefetchSummary:
    images: int
    characters: int
    alphabets: int
    image_size: int
    seconds: float
    output: Path


@dataclass
class OmniglotArrays:
    """A loaded prefetch file (see the module docstring for the meaning of each field).

    images: uint8 [N, S, S] (255 = ink); character, drawer, alphabet, origin: int64 [N];
    character_alphabet, character_origin: int64 [C].
    """

    images: torch.Tensor
    character: torch.Tensor
    drawer: torch.Tensor
    alphabet: torch.Tensor
    origin: torch.Tensor
    alphabet_names: list[str]
    character_names: list[str]
    character_alphabet: torch.Tensor
    character_origin: torch.Tensor
    drawings_per_character: int
    image_size: int

    @property
    def num_characters(self) -> int:
        return len(self.character_names)


def decode_drawing(png: bytes, image_size: int) -> np.ndarray:
    """One PNG -> uint8 [image_size, image_size] with 0 = paper and 255 = full ink."""
    with Image.open(io.BytesIO(png)) as image:
        grey = image.convert("L")  # mode "1": paper 255, ink 0
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), resample=Image.LANCZOS)
    return 255 - np.asarray(grey, dtype=np.uint8)


def _decode_members(
    archive: zipfile.ZipFile, label: str, members: tuple[str, ...], image_size: int
) -> np.ndarray:
    """Decode ``members`` of ``archive`` -> uint8 [len(members), S, S]; ``label`` for errors."""
    images = np.empty((len(members), image_size, image_size), dtype=np.uint8)
    for row, member in enumerate(members):
        try:
            images[row] = decode_drawing(archive.read(member), image_size)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
            raise ArchiveError(f"{label}: cannot decode '{member}' ({error})") from error
    return images


# Each worker process opens its own handles in its initializer: a zip handle inherited
# through fork would share its file offset with the parent and the other workers.
_worker_archives: dict[str, zipfile.ZipFile] = {}


def _open_worker_archives(archive_paths: list[str]) -> None:
    _worker_archives.clear()
    for path in archive_paths:
        _worker_archives[path] = zipfile.ZipFile(path)


def _decode_task_in_worker(task: tuple[str, tuple[str, ...], int]) -> np.ndarray:
    archive_path, members, image_size = task
    return _decode_members(_worker_archives[archive_path], archive_path, members, image_size)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fork where available: "spawn" re-imports the caller's main module in every worker,
    which for the pipeline's stage scripts means importing torch (~5-10 s per worker on a
    busy machine). Forked workers run only zipfile, Pillow and numpy code, none of which
    uses the parent's threads (torch's thread pools, tqdm's monitor)."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _read_layouts(archives: dict[str, Path]) -> list[ArchiveLayout]:
    unknown = sorted(set(archives) - set(ARCHIVE_NAMES))
    if unknown or not archives:
        raise PrefetchError(
            f"expected archives named {list(ARCHIVE_NAMES)}, got {sorted(archives)}"
        )
    layouts = []
    for name in ARCHIVE_NAMES:
        if name not in archives:
            continue
        try:
            with zipfile.ZipFile(archives[name]) as archive:
                layouts.append(read_layout(archive, name, archives[name]))
        except (zipfile.BadZipFile, OSError) as error:
            raise ArchiveError(f"{archives[name]}: cannot open as a zip ({error})") from error
    return layouts


def _drawings_per_character(layouts: list[ArchiveLayout], archives: dict[str, Path]) -> int:
    """The common number of drawings of every character; PrefetchError if they differ."""
    counts: dict[int, tuple[str, str]] = {}  # count -> (archive name, character) seen with it
    for layout in layouts:
        for character in layout.characters:
            counts.setdefault(len(character.drawings), (layout.name, character.name))
    if len(counts) != 1:
        examples = "; ".join(
            f"{count} in {archives[name]}:{character}"
            for count, (name, character) in counts.items()
        )
        raise PrefetchError(
            "expected every character to have the same number of drawings (so that character "
            f"c owns rows c*D..c*D+D-1), found different counts, e.g. {examples}"
        )
    (drawings,) = counts
    if drawings == 0:
        raise PrefetchError(
            f"expected drawings in {[str(p) for p in archives.values()]}, found none"
        )
    return drawings


def _metadata_arrays(layouts: list[ArchiveLayout], drawings: int) -> dict[str, np.ndarray]:
    """Every array of the file except ``images``, in the documented row order."""
    alphabet_keys = [(origin, a) for origin, lay in _origins(layouts) for a in lay.alphabets]
    alphabet_index = {key: index for index, key in enumerate(alphabet_keys)}
    character_names, character_alphabet, character_origin, drawer = [], [], [], []
    for origin, layout in _origins(layouts):
        for character in layout.characters:
            character_names.append(character.name)
            character_alphabet.append(alphabet_index[(origin, character.alphabet)])
            character_origin.append(origin)
            drawer.extend(d.drawer for d in character.drawings)
    # The dtypes of the file bound the ids: int16 characters/alphabets, int8 drawers.
    if max(drawer) > np.iinfo(np.int8).max or len(character_names) > np.iinfo(np.int16).max:
        raise PrefetchError(
            f"expected at most 127 drawers and 32767 characters, found drawer {max(drawer)} "
            f"and {len(character_names)} characters"
        )
    character_alphabet_array = np.array(character_alphabet, dtype=np.int16)
    character_origin_array = np.array(character_origin, dtype=np.uint8)
    return {
        "character": np.repeat(np.arange(len(character_names), dtype=np.int16), drawings),
        "drawer": np.array(drawer, dtype=np.int8),
        "alphabet": np.repeat(character_alphabet_array, drawings),
        "origin": np.repeat(character_origin_array, drawings),
        "alphabet_names": np.array([name for _, name in alphabet_keys], dtype=np.str_),
        "character_names": np.array(character_names, dtype=np.str_),
        "character_alphabet": character_alphabet_array,
        "character_origin": character_origin_array,
        "drawings_per_character": np.array(drawings, dtype=np.int64),
    }


def _origins(layouts: list[ArchiveLayout]) -> list[tuple[int, ArchiveLayout]]:
    return [(ARCHIVE_NAMES.index(layout.name), layout) for layout in layouts]


def _tasks(
    layouts: list[ArchiveLayout], archives: dict[str, Path], image_size: int
) -> list[tuple[str, tuple[str, ...], int]]:
    """Consecutive runs of drawings, in row order, each run within one archive."""
    tasks = []
    for layout in layouts:
        members = [d.member for c in layout.characters for d in c.drawings]
        for start in range(0, len(members), _DRAWINGS_PER_TASK):
            chunk = tuple(members[start : start + _DRAWINGS_PER_TASK])
            tasks.append((str(archives[layout.name]), chunk, image_size))
    return tasks


def _save_atomically(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz via a temporary ``.part`` file beside ``output``.

    The file gets the permissions of an ordinary new file, not mkstemp's owner-only ones.
    """
    with atomic_output(output, suffix=".part", umask_permissions=True) as file:
        np.savez(file, **arrays)  # a file object keeps numpy from appending ".npz"


def prefetch_omniglot(
    archives: dict[str, Path],
    image_size: int,
    output: Path,
    workers: int = 2,
    progress: bool = True,
) -> PrefetchSummary:
    """Decode every drawing of ``archives`` into the ``.npz`` at ``output``.

    ``archives`` maps archive names (``images_background``, ``images_evaluation``) to zip
    paths; the file layout is described in the module docstring. The zips' entry names are
    checked with ``read_layout`` and every character must have the same number of drawings
    (PrefetchError otherwise). Decoding runs in a pool of ``workers`` processes (in this
    process if ``workers`` <= 1). The file is written atomically.
    """
    if not 1 <= image_size <= 4096:
        raise PrefetchError(f"expected an image size in 1..4096, got {image_size}")
    started = time.perf_counter()
    archives = {name: Path(path) for name, path in archives.items()}
    output = Path(output)
    layouts = _read_layouts(archives)
    drawings = _drawings_per_character(layouts, archives)
    arrays = _metadata_arrays(layouts, drawings)
    total = len(arrays["character"])
    images = np.empty((total, image_size, image_size), dtype=np.uint8)
    tasks = _tasks(layouts, archives, image_size)
    with ExitStack() as stack:
        if workers > 1:
            # An executor (unlike multiprocessing.Pool) fails instead of hanging when a
            # worker process dies or cannot start.
            pool = ProcessPoolExecutor(
                max_workers=min(workers, len(tasks)),
                mp_context=_worker_context(),
                initializer=_open_worker_archives,
                initargs=([str(path) for path in archives.values()],),
            )
            # On an error, drop the queued tasks instead of decoding them all first.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            chunks = pool.map(_decode_task_in_worker, tasks)
        else:
            opened = {
                str(path): stack.enter_context(zipfile.ZipFile(path)) for path in archives.values()
            }
            chunks = (
                _decode_members(opened[path], path, members, size) for path, members, size in tasks
            )
        bar = stack.enter_context(
            tqdm(total=total, unit="img", desc=f"prefetch {image_size}px", disable=not progress)
        )
        row = 0
        for chunk in chunks:
            images[row : row + len(chunk)] = chunk
            row += len(chunk)
            bar.update(len(chunk))
    arrays["images"] = images
    arrays["image_size"] = np.array(image_size, dtype=np.int64)
    _save_atomically(output, arrays)
    return PrefetchSummary(
        images=total,
        characters=len(arrays["character_names"]),
        alphabets=len(arrays["alphabet_names"]),
        image_size=image_size,
        seconds=time.perf_counter() - started,
        output=output,
    )


def _check_consistent(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Raise PrefetchError naming ``path`` if the arrays do not fit the documented layout."""
    problems = [
        f"'{key}' has dtype {arrays[key].dtype}, expected {dtype}"
        for key, dtype in ARRAY_DTYPES.items()
        if arrays[key].dtype != dtype
    ]
    problems += [
        f"'{key}' has dtype {arrays[key].dtype}, expected a unicode string array"
        for key in STRING_ARRAYS
        if arrays[key].dtype.kind != "U"
    ]
    if problems:
        raise PrefetchError(f"{path}: not a valid Omniglot prefetch file: " + "; ".join(problems))
    size = int(arrays["image_size"])
    drawings = int(arrays["drawings_per_character"])
    characters = len(arrays["character_names"])
    total = characters * drawings
    expected_shapes = {
        "images": (total, size, size),
        "character": (total,),
        "drawer": (total,),
        "alphabet": (total,),
        "origin": (total,),
        "alphabet_names": (len(arrays["alphabet_names"]),),
        "character_names": (characters,),
        "character_alphabet": (characters,),
        "character_origin": (characters,),
        "drawings_per_character": (),
        "image_size": (),
    }
    problems = [
        f"'{key}' has shape {tuple(arrays[key].shape)}, expected {shape}"
        for key, shape in expected_shapes.items()
        if tuple(arrays[key].shape) != shape
    ]
    if not problems:
        row_character = np.repeat(np.arange(characters), drawings)
        if not np.array_equal(arrays["character"], row_character):
            problems.append(f"'character' is not sorted with {drawings} rows per character")
        if not np.array_equal(arrays["alphabet"], arrays["character_alphabet"][row_character]):
            problems.append("'alphabet' disagrees with 'character_alphabet'")
        if not np.array_equal(arrays["origin"], arrays["character_origin"][row_character]):
            problems.append("'origin' disagrees with 'character_origin'")
    if problems:
        raise PrefetchError(f"{path}: not a valid Omniglot prefetch file: " + "; ".join(problems))


def load_prefetched(path: Path) -> OmniglotArrays:
    """Load a file written by ``prefetch_omniglot`` as torch tensors (see OmniglotArrays).

    Raises FileNotFoundError if ``path`` does not exist, and PrefetchError naming the file
    and the problem if keys are missing or dtypes/shapes do not fit the layout.
    """
    import torch  # imported here: decoding (e.g. in spawned workers) never needs torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prefetched Omniglot file (run the prefetch first)")
    keys = (*ARRAY_DTYPES, *STRING_ARRAYS)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in keys if key not in npz.files]
            if missing:
                raise PrefetchError(
                    f"{path}: not a valid Omniglot prefetch file: missing key(s) {missing}"
                )
            arrays = {key: npz[key] for key in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise PrefetchError(f"{path}: cannot read as an npz file ({error})") from error
    _check_consistent(arrays, path)

    def as_long(key: str) -> torch.Tensor:
        return torch.from_numpy(arrays[key].astype(np.int64))

    return OmniglotArrays(
        images=torch.from_numpy(arrays["images"]),
        character=as_long("character"),
        drawer=as_long("drawer"),
        alphabet=as_long("alphabet"),
        origin=as_long("origin"),
        alphabet_names=arrays["alphabet_names"].tolist(),
        character_names=arrays["character_names"].tolist(),
        character_alphabet=as_long("character_alphabet"),
        character_origin=as_long("character_origin"),
        drawings_per_character=int(arrays["drawings_per_character"]),
        image_size=int(arrays["image_size"]),
    )
