"""Shared fixtures: one torch thread per test; tiny Omniglot archives in the official layout
(see omniglot_fixture)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omniglot_fixture import expected_counts, make_omniglot_archives

from metalab.data.archives import ArchiveCounts
from metalab.data.prefetch import prefetch_omniglot


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread for every test, the previous count restored after: the tests use
    tiny tensors on a shared 2-core machine, where a thread pool per process only adds
    contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding images_background.zip (4 alphabets x 5 characters) and
    images_evaluation.zip (3 x 4), 20 drawings each, seed 0. Do not modify it: copy first."""
    directory = tmp_path_factory.mktemp("tiny_omniglot")
    make_omniglot_archives(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_expected_counts() -> dict[str, ArchiveCounts]:
    """The counts of the archives in ``tiny_omniglot_dir``."""
    return expected_counts()


@pytest.fixture(scope="session")
def tiny_prefetched_28(tiny_omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 28x28 prefetch file (``prefetch_omniglot``) of ``tiny_omniglot_dir``: 640 images
    of 32 characters (20 background, then 12 evaluation), 20 drawings each."""
    archives = {
        name: tiny_omniglot_dir / f"{name}.zip"
        for name in ("images_background", "images_evaluation")
    }
    output = tmp_path_factory.mktemp("tiny_prefetched") / "omniglot_28.npz"
    prefetch_omniglot(archives, image_size=28, output=output, workers=1, progress=False)
    return output
