"""Atomic file outputs: write to a temporary file beside the target, then rename.

A stage killed mid-write leaves either the old file or none, never half a file, and the
next successful write of the same file removes the temporary it left. Importing
this module does not import torch (``save_torch`` imports it when called), so stages that
only download or decode data stay light.
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


def _new_file_mode() -> int:
    """The permissions ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)  # the umask can only be read by setting it
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(
    path: str | Path, *, suffix: str = ".tmp", umask_permissions: bool = False
) -> Iterator[Path]:
    """Yield the path of an empty temporary file that replaces `path` if the block succeeds.

    For writers that need a file name rather than a handle (downloads, copies, checks).
    The temporary file is ``.<name>.<random><suffix>`` beside `path`; after the block it is
    synced to disk and renamed onto `path`. If the block raises (KeyboardInterrupt too) it
    is removed and `path` keeps its old content, or stays absent. The file is created by
    ``tempfile.mkstemp``, hence readable by the owner only; with `umask_permissions` the
    final file gets the permissions an ordinary new file would get instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=suffix
    )
    os.close(descriptor)
    temporary = Path(temporary_name)
    try:
        yield temporary
        with open(temporary, "rb+") as written:  # rb+: fsync needs a writable handle on Windows
            os.fsync(written.fileno())
        if umask_permissions:
            os.chmod(temporary, _new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    remove_orphaned_temporaries(path, suffix)


def remove_orphaned_temporaries(path: str | Path, suffix: str = ".tmp") -> list[Path]:
    """Delete the temporaries that writers of `path` killed mid-write left beside it
    (``.<name>.<random><suffix>``); returns them. `atomic_path` calls this after each
    successful write, so a later run cleans up after a killed one (each output has one
    writer at a time in this pipeline)."""
    path = Path(path)
    orphans = sorted(path.parent.glob(f".{glob_escape(path.name)}.*{glob_escape(suffix)}"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def glob_escape(text: str) -> str:
    """`text` as a literal inside a glob pattern."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


@contextmanager
def atomic_output(
    path: str | Path, *, suffix: str = ".tmp", umask_permissions: bool = False
) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces `path` only if the block succeeds.

    `suffix` and `umask_permissions` as for `atomic_path`.
    """
    with (
        atomic_path(path, suffix=suffix, umask_permissions=umask_permissions) as temporary,
        open(temporary, "wb") as handle,
    ):
        yield handle


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


def on_cpu(payload: Any) -> Any:
    """`payload` with every tensor in its dicts, lists and tuples on the CPU, so a file
    written from a GPU run loads anywhere. What holds no tensor elsewhere is returned as
    the very same object (a CPU run's file keeps its exact bytes); a container that does
    keeps its type (an ``OrderedDict`` state dict its ``_metadata``, a named tuple its
    fields)."""
    import torch

    if isinstance(payload, torch.Tensor):
        return payload if payload.device.type == "cpu" else payload.cpu()
    if isinstance(payload, dict):
        moved = {key: on_cpu(value) for key, value in payload.items()}
        if all(moved[key] is value for key, value in payload.items()):
            return payload
        copy = type(payload)(moved) if type(payload) is not dict else moved
        if hasattr(payload, "_metadata"):
            copy._metadata = payload._metadata  # state-dict version info
        return copy
    if isinstance(payload, list | tuple):
        items = [on_cpu(value) for value in payload]
        if all(new is old for new, old in zip(items, payload, strict=True)):
            return payload
        if hasattr(payload, "_fields"):  # a named tuple
            return type(payload)(*items)
        return type(payload)(items)
    return payload


def save_torch(path: str | Path, payload: Any) -> None:
    """`torch.save` of `payload` with its tensors on the CPU, atomically."""
    import torch  # here, not at the top: see the module docstring

    payload = on_cpu(payload)
    with atomic_output(path) as handle:
        torch.save(payload, handle)
