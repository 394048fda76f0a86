"""Numeric precision of a learner's forward passes: one autocast helper for every learner.

``fp32`` runs as is; ``bf16`` runs the forward passes under bfloat16 autocast while the
parameters, losses and optimizer state stay float32. Autocast belongs to a device type, so
every caller names the device type of the tensors it computes on (``x.device.type``);
device types without bf16 autocast here (e.g. ``meta``, which shape-checks code without
computing) run in full precision.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from metalab.runtime import cpu_flags

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
#: Device types whose forward passes run under bf16 autocast with ``bf16``.
AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda"})


def autocast(precision: Precision, device_type: str) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device_type`` (a no-op for fp32, and on
    device types outside `AUTOCAST_DEVICE_TYPES`)."""
    if device_type not in AUTOCAST_DEVICE_TYPES:
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(device_type: str) -> AbstractContextManager:
    """A block that runs in full precision inside an autocast region of ``device_type``
    (e.g. statistics)."""
    if device_type not in AUTOCAST_DEVICE_TYPES:
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU advertises bf16 arithmetic (AVX512-BF16 or AMX); None if unknown.

    Without it, oneDNN emulates bf16 convolutions and bf16 autocast is slower than fp32."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & NATIVE_BF16_FLAGS)


def check_precision(precision: str) -> Precision:
    """``precision`` if known (else ValueError), warning when bf16 would be emulated on
    this machine's CPU (learners are built on the CPU before moving to their device, so the
    warning names the CPU: a run on a CUDA device is not affected)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and cpu_has_native_bf16() is False:
        warnings.warn(
            "precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16/AMX), "
            "so bf16 autocast is emulated and slower than fp32 when computing on the CPU "
            "(a CUDA device is not affected)",
            stacklevel=3,
        )
    return precision  # type: ignore[return-value]
