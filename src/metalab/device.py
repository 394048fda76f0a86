"""Where a stage computes: the device and the thread count, execution settings of the machine.

``METALAB_DEVICE`` (``auto``, the default: the CUDA device when there is one, else the CPU;
``cpu``; ``cuda``; ``cuda:N``) and ``METALAB_THREADS`` (default: every core of the machine,
or the cores of this rank under torchrun) are environment variables, not DVC params:
switching them does not invalidate a result. Each run records what it used
(`device_record`) in its metrics file and MLflow tags. Asking for CUDA where there is none
is a `DeviceSettingError` (exit 2, one line naming CUDA).

Nothing here touches CUDA unless the setting asks for it or ``auto`` finds it, and
`configure` hides the GPUs from a CPU run, so it never initialises a CUDA context.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from metalab.schema import ParamsError

DEVICE_VARIABLE = "METALAB_DEVICE"
THREADS_VARIABLE = "METALAB_THREADS"
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class DeviceSettingError(ParamsError):
    """``METALAB_DEVICE`` or ``METALAB_THREADS`` asks for what this machine cannot give."""


def _cuda_problem() -> str:
    built = torch.version.cuda
    if built is None:
        return f"this torch {torch.__version__} is built without CUDA"
    return f"torch {torch.__version__} (CUDA {built}) finds no CUDA device on this machine"


def resolve_device(
    setting: str | None = None,
    local_rank: int = 0,
    environ: Mapping[str, str] = os.environ,
) -> torch.device:
    """The device `setting` (default: ``METALAB_DEVICE``, else ``auto``) names.

    ``auto`` and ``cuda`` pick ``cuda:<local_rank>`` (one GPU per torchrun rank on a machine)
    when the machine has more GPUs than `local_rank`, else ``cuda:0``; ``cuda:N`` is GPU N.
    """
    raw = environ.get(DEVICE_VARIABLE, "auto") if setting is None else setting
    value = raw.strip().lower() or "auto"
    if value == "cpu":
        return torch.device("cpu")
    if value == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    index_match = _CUDA_INDEX.fullmatch(value)
    if value not in ("auto", "cuda") and index_match is None:
        raise DeviceSettingError(
            f"{DEVICE_VARIABLE}={raw}: not a device; allowed: {DEVICE_CHOICES}"
        )
    if not torch.cuda.is_available():
        raise DeviceSettingError(
            f"{DEVICE_VARIABLE}={raw}: CUDA is not available ({_cuda_problem()}); "
            f"use {DEVICE_VARIABLE}=cpu or auto"
        )
    count = torch.cuda.device_count()
    if index_match is not None:
        index = int(index_match.group(1))
        if index >= count:
            raise DeviceSettingError(
                f"{DEVICE_VARIABLE}={raw}: CUDA device {index} does not exist; this machine "
                f"has {count} (cuda:0..cuda:{count - 1})"
            )
    else:
        index = local_rank if local_rank < count else 0
    return torch.device("cuda", index)


def thread_count(processes_on_machine: int = 1, environ: Mapping[str, str] = os.environ) -> int:
    """Torch threads for this process: ``METALAB_THREADS``, else the machine's cores shared
    evenly among the `processes_on_machine` processes (torchrun ranks) running on it."""
    raw = environ.get(THREADS_VARIABLE)
    if raw is None or not raw.strip():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, (cores or os.cpu_count() or 1) // max(1, processes_on_machine))
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise DeviceSettingError(f"{THREADS_VARIABLE}={raw}: must be a whole number >= 1")
    return threads


def describe(device: torch.device) -> str:
    """The device's name: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from metalab.runtime import cpu_model

    return cpu_model()


@dataclass(frozen=True)
class DeviceRecord:
    """What a run records about where it ran (metrics files and MLflow tags)."""

    device: str  # "cpu" or "cuda:N"
    device_name: str
    threads: int
    torch_version: str
    cuda_version: str | None  # the CUDA torch is built with; None for a CPU build

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}


def device_record(device: torch.device, threads: int | None = None) -> DeviceRecord:
    return DeviceRecord(
        device=str(device),
        device_name=describe(device),
        threads=torch.get_num_threads() if threads is None else threads,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock read after
    it measures the work; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DETERMINISTIC_VARIABLE = "METALAB_DETERMINISTIC"


def deterministic_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(DETERMINISTIC_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def configure(device: torch.device, threads: int, environ: Mapping[str, str] = os.environ) -> None:
    """Set this process up to compute on `device` with `threads` torch threads.

    TF32 stays off on GPUs, so ``fp32`` means float32 matmuls and convolutions everywhere
    (``train.precision: bf16`` is the explicit way to trade precision for speed). Runs are
    seeded; ``METALAB_DETERMINISTIC=1`` also asks torch for deterministic kernels (cuDNN and
    cuBLAS included; slower on a GPU; on the CPU the kernels used here already are).
    """
    torch.set_num_threads(threads)
    if device.type == "cpu" and not torch.cuda.is_initialized():
        # Hide the GPUs: torch itself reaches for the accelerator when it sees one (each
        # optimizer step asks for the current CUDA stream), which would create a CUDA
        # context in a CPU run. Read when CUDA initialises, so in time before that.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if deterministic_requested(environ):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
