"""Process-wide CPU settings: the allocator keeps freed memory for reuse."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from metalab import runtime, tracking
from metalab.runtime import keep_freed_memory, max_rss_mb

# Like a training step: allocate a few activation-sized tensors (16 MiB each), free them
# together, repeat; prints the minor page faults after a warmup.
FAULTS = """
import resource, sys, torch
from metalab.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    activations = [torch.ones(4 << 20) for _ in range(6)]
    del activations
for _ in range(3):  # warm up torch and the heap
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_activations_are_reused_instead_of_page_faulting_again():
    """20 steps x 6 tensors x 4096 pages: glibc's default trims the freed heap (or unmaps the
    blocks) and faults the pages in again on most runs, up to ~490,000 faults (seen on 4 of
    6 runs here; whether it trims depends on the heap layout). Kept memory: none, ever."""
    for _ in range(3):
        command = [sys.executable, "-c", FAULTS, "keep"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        assert int(result.stdout) < 5_000


class FakeLibc:
    """Stands in for ``ctypes.CDLL("libc")``: a mallopt that records its calls and accepts
    them unless ``rejects(parameter, value)``."""

    def __init__(self, rejects=lambda parameter, value: False) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(parameter: int, value: int) -> int:
            self.calls.append((parameter, value))
            return 0 if rejects(parameter, value) else 1

        self.mallopt = mallopt


@pytest.fixture
def fake_libc(monkeypatch):
    """Install a FakeLibc for `keep_freed_memory` (with its cache cleared before and after,
    so neither the real call of another test nor this fake leaks across tests)."""

    def install(**kwargs) -> FakeLibc:
        libc = FakeLibc(**kwargs)
        monkeypatch.setattr(runtime.ctypes.util, "find_library", lambda name: "libc.so.6")
        monkeypatch.setattr(runtime.ctypes, "CDLL", lambda path: libc)
        return libc

    clear = getattr(keep_freed_memory, "cache_clear", lambda: None)
    clear()
    yield install
    clear()


ALL_SETTINGS = [
    (runtime._M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD),
    (runtime._M_TRIM_THRESHOLD, runtime.TRIM_THRESHOLD),
    (runtime._M_TOP_PAD, runtime.TOP_PAD),
]


def test_keep_freed_memory_is_idempotent(fake_libc):
    """The settings are applied once per process: a second call changes nothing."""
    libc = fake_libc()
    assert keep_freed_memory() is True
    assert libc.calls == ALL_SETTINGS
    assert keep_freed_memory() is True
    assert libc.calls == ALL_SETTINGS  # mallopt was not called again


def test_keep_freed_memory_falls_back_to_the_old_glibc_threshold_limit(fake_libc):
    libc = fake_libc(
        rejects=lambda parameter, value: (
            (parameter, value) == (runtime._M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD)
        )
    )
    assert keep_freed_memory() is True
    assert libc.calls[:2] == [
        (runtime._M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD),
        (runtime._M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD_FALLBACK),
    ]
    assert libc.calls[2:] == ALL_SETTINGS[1:]


def test_keep_freed_memory_reports_settings_that_did_not_take(fake_libc):
    libc = fake_libc(rejects=lambda parameter, value: parameter == runtime._M_TOP_PAD)
    assert keep_freed_memory() is False
    assert libc.calls == ALL_SETTINGS
    assert keep_freed_memory() is False and libc.calls == ALL_SETTINGS  # cached too


def test_malloc_arenas_are_left_to_glibc_unless_capped(fake_libc):
    """One arena made task-parallel threads slower (benchmarks/allocator.py): by default
    the arena count is not touched; a cap is applied when asked for."""
    libc = fake_libc()
    assert keep_freed_memory() is True
    assert all(parameter != runtime._M_ARENA_MAX for parameter, _ in libc.calls)
    assert keep_freed_memory(arena_max=1) is True
    assert libc.calls[-1] == (runtime._M_ARENA_MAX, 1)


def test_keep_freed_memory_without_a_c_library_changes_nothing(monkeypatch, fake_libc):
    libc = fake_libc()
    monkeypatch.setattr(runtime.ctypes.util, "find_library", lambda name: None)
    assert keep_freed_memory() is False
    assert libc.calls == []


# In a fresh process: bytes in mmapped blocks (glibc mallinfo2) grow by a 16 MiB malloc
# under glibc's defaults (above its 128 KiB mmap threshold) but not once the settings are
# in force; and freeing it then does not trim the heap.
MMAP_BYTES = """
import ctypes, ctypes.util, sys
from metalab.runtime import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(16 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena - before.arena, after.arena - before.arena)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallinfo2")
def test_settings_serve_large_blocks_from_the_heap_and_keep_it():
    def run(mode: str) -> list[int]:
        command = [sys.executable, "-c", MMAP_BYTES, mode]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return [int(value) for value in result.stdout.split()]

    mmapped, _, _ = run("default")
    assert mmapped >= 16 << 20  # the glibc default: a fresh mapping
    mmapped, heap_growth, heap_kept = run("keep")
    assert mmapped == 0  # from the heap instead
    assert heap_growth >= 16 << 20 and heap_kept == heap_growth  # not trimmed on free


@pytest.mark.parametrize(
    ("platform", "raw", "expected_mb"), [("linux", 2048, 2.0), ("darwin", 3 * 2**20, 3.0)]
)
def test_peak_rss_is_in_megabytes_on_linux_and_macos(monkeypatch, platform, raw, expected_mb):
    # ru_maxrss is KiB on Linux but bytes on macOS: one unit would be 1000x off on the other.
    import resource

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=raw))
    assert max_rss_mb() == expected_mb
    assert tracking.peak_memory_mb() == expected_mb
