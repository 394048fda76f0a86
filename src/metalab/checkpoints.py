"""Resumable training state, bound to the exact inputs that produced it.

A `Checkpoint` file holds ``{"fingerprint": ..., "state": ...}``. The fingerprint covers
everything a run's result depends on: the resolved configuration, the content of every
input it reads (prefetched images, the starting weights, which include a pretrained body)
and the source of the code (`source_digest`). A checkpoint is resumed only when its
fingerprint equals the running one; a checkpoint of other inputs, finished or not, or one
that cannot be read, is set aside (renamed ``<name>.stale``) with a message, never resumed
and never overwritten before it is moved.

Files are read with ``torch.load(weights_only=True)``: a state is plain values and
tensors, and nothing in a file can run code. A state holding a NaN or infinite tensor is
never written. Vision training (`metalab.training.Trainer`) and meta-RL training
(`stages/train_rl.py`) both use this.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from metalab.errors import MetalabError
from metalab.io import save_torch

PACKAGE_DIR = Path(__file__).resolve().parent


def fingerprint(payload: Mapping[str, Any]) -> str:
    """Hash of everything that determines a run (sha256 of its sorted JSON)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (their content, wherever they live)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """`tensor_digest` of a state dict, keys included."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(tensor_digest(state[key]).encode())
    return digest.hexdigest()


@functools.cache
def source_digest() -> str:
    """sha256 of every Python source file of the metalab package (paths and contents): a
    code change makes earlier checkpoints another run's."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tensors_in(value: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state (dicts, lists, tuples) with its location."""
    if isinstance(value, torch.Tensor):
        yield where or "(top level)", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from tensors_in(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from tensors_in(item, f"{where}[{index}]")


def non_finite_entries(state: Any) -> list[str]:
    """Locations of floating-point tensors in `state` holding a NaN or an infinity."""
    return [
        where
        for where, tensor in tensors_in(state)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


class Checkpoint:
    """The checkpoint file at ``path`` for a run whose inputs hash to ``fingerprint``."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    @property
    def stale_path(self) -> Path:
        return self.path.with_name(self.path.name + ".stale")

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (a kill mid-write leaves the previous checkpoint);
        `MetalabError` instead if it holds a non-finite tensor."""
        bad = non_finite_entries(state)
        if bad:
            raise MetalabError(
                f"{self.path}: not saved, the state has non-finite values in "
                f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            )
        save_torch(self.path, {"fingerprint": self.fingerprint, "state": state})

    def load(self) -> dict[str, Any] | None:
        """The saved state if the file exists and belongs to this run; otherwise None, and
        a checkpoint of other inputs or an unreadable one is set aside."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for foreign or truncated bytes
            self._set_aside(f"unreadable ({type(error).__name__})")
            return None
        if not isinstance(saved, dict) or "state" not in saved:
            self._set_aside("not a metalab checkpoint")
            return None
        if saved.get("fingerprint") != self.fingerprint:
            self._set_aside("from other inputs (configuration, data, starting weights or code)")
            return None
        return saved["state"]

    def _set_aside(self, reason: str) -> None:
        self.path.replace(self.stale_path)
        print(f"{self.path}: {reason}; set aside as {self.stale_path}, starting afresh")
