"""Process-wide CPU settings for fast meta-training.

Meta-training allocates and frees the same large activation tensors (tens of MB) every
task chunk. glibc's malloc serves blocks above its mmap threshold with fresh ``mmap``
pages and returns them to the kernel on free, so every allocation page-faults again on
first touch, and it trims the freed top of the heap likewise: measured here, up to
380,000 minor page faults per MAML C1 meta-iteration (32 tasks; benchmarks/throughput.py,
``glibc-default`` rows; 18,000-380,000 across runs, as the heap layout varies) and up to
a quarter of its wall-clock time. Serving blocks up to 1 GiB from the heap and never
trimming it lets freed blocks be reused instead (at most a few thousand faults per
iteration in those runs).
The cost is that the process keeps its peak heap until it exits, which a training process
does anyway. The malloc arenas stay at glibc's default (one per thread, up to 8 per core):
capping them at one, so that task-parallel threads share the kept heap, cost 2.5-6.5% of
the MAML step at two threads here and 15-45% on a 2-core AMX machine, while the faults
stay as low without the cap (benchmarks/allocator.py; README "Speed on a CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks up to 1 GiB come from the heap (a chunk of 4 fp32 tasks has 60 MB activations).
# Older glibc rejects thresholds above 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX); then that.
MMAP_THRESHOLD = 1024 * 1024 * 1024
MMAP_THRESHOLD_FALLBACK = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # largest int: in practice never give the heap back
TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps
ARENA_MAX: int | None = None  # glibc's default


@functools.cache
def keep_freed_memory(arena_max: int | None = ARENA_MAX) -> bool:
    """Make the C allocator reuse freed memory instead of returning it to the kernel.

    ``arena_max`` caps glibc's malloc arenas (None, the default: glibc's own cap, 8 per
    core; benchmarks/allocator.py measures 1 against it).
    Idempotent; returns whether the settings took effect (False off glibc, e.g. macOS or
    musl, where nothing is changed).
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    threshold_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not threshold_set:
        threshold_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK) == 1
    settings = [(_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)]
    if arena_max is not None:
        settings.append((_M_ARENA_MAX, arena_max))
    return all([mallopt(parameter, value) == 1 for parameter, value in settings]) and threshold_set


@functools.cache
def _cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def cpu_flags() -> frozenset[str] | None:
    """The instruction-set flags the CPU advertises (Linux /proc/cpuinfo); None if unknown."""
    info = _cpuinfo()
    return None if info is None else frozenset(info.split())


def cpu_model() -> str:
    """The CPU's model name ('model name' in /proc/cpuinfo), else what platform reports."""
    for line in (_cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def max_rss_mb(who: int | None = None) -> float:
    """Peak resident set size in MB from ``getrusage(who)`` (default: this process).

    ``ru_maxrss`` is in KiB on Linux and the BSDs but in bytes on macOS."""
    import resource
    import sys

    usage = resource.getrusage(resource.RUSAGE_SELF if who is None else who).ru_maxrss
    return usage / (1024 * 1024) if sys.platform == "darwin" else usage / 1024
