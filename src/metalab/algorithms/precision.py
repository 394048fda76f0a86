"""Numeric precision of a learner's forward passes: one autocast helper for every learner.

``fp32`` runs as is; ``bf16`` runs the forward passes under bfloat16 autocast while the
parameters, losses and optimizer state stay float32.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from typing import Literal

import torch

from metalab.runtime import cpu_flags

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def autocast(precision: Precision, device_type: str = "cpu") -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device_type`` (a no-op for fp32)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(device_type: str = "cpu") -> AbstractContextManager:
    """A block that runs in full precision inside an autocast region (e.g. statistics)."""
    return torch.autocast(device_type, enabled=False)


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU advertises bf16 arithmetic (AVX512-BF16 or AMX); None if unknown.

    Without it, oneDNN emulates bf16 convolutions and bf16 autocast is slower than fp32."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & NATIVE_BF16_FLAGS)


def check_precision(precision: str) -> Precision:
    """``precision`` if known (else ValueError), warning when bf16 would be emulated."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and cpu_has_native_bf16() is False:
        warnings.warn(
            "precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16/AMX), "
            "so bf16 autocast is emulated and slower than fp32",
            stacklevel=3,
        )
    return precision  # type: ignore[return-value]
