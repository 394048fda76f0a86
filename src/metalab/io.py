"""Atomic file outputs: write to a temporary file beside the target, then rename.

A stage killed mid-write leaves either the old file or none, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


@contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: Any) -> None:
    """Pretty JSON, atomically."""
    with atomic_output(path) as handle:
        handle.write((json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as handle:
        handle.write(text.encode())


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Uncompressed .npz (fast to load), atomically."""
    with atomic_output(path) as handle:
        np.savez(handle, **arrays)


def save_torch(path: str | Path, payload: Any) -> None:
    """`torch.save`, atomically."""
    with atomic_output(path) as handle:
        torch.save(payload, handle)
