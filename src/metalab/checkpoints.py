"""Resumable training state, bound to the inputs that produced it.

A `Checkpoint` file holds ``{"fingerprint": ..., "state": ...}``. It is resumed only when
its fingerprint equals the running configuration's; it is read with
``torch.load(weights_only=True)``, so a state is plain values and tensors and nothing in a
file can run code. Vision training (`metalab.training.Trainer`) and meta-RL training
(`stages/train_rl.py`) both use it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from metalab.errors import MetalabError
from metalab.io import save_torch


def fingerprint(payload: Mapping[str, Any]) -> str:
    """Hash of everything that determines a run (sha256 of its sorted JSON)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    """The checkpoint file at ``path`` for a run whose inputs hash to ``fingerprint``."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: a kill mid-write leaves the previous checkpoint."""
        save_torch(self.path, {"fingerprint": self.fingerprint, "state": state})

    def load(self) -> dict[str, Any] | None:
        """The saved state if the file exists and belongs to this run, else None."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for foreign or truncated bytes
            raise MetalabError(
                f"{self.path}: unreadable checkpoint ({type(error).__name__}); "
                "delete it to start afresh"
            ) from error
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            print(f"{self.path}: from a different configuration, starting afresh")
            return None
        return saved["state"]
