"""Time prefetch_omniglot and load_prefetched on the real Omniglot archives.

    python benchmarks/prefetch.py [--archives DIR] [--sizes 28 105] [--workers 2]

For each image size: one prefetch of both archives (into a temporary directory) and the
best of three loads of the result. Prints a table and writes benchmarks/results/prefetch.json
(a list of rows: image_size, images, prefetch_seconds, load_seconds, file_mb, plus workers
and the 1-minute load average at the start, since the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch  # imported up front so that the load timings do not include importing torch

from metalab.data.archives import ARCHIVE_NAMES
from metalab.data.prefetch import load_prefetched, prefetch_omniglot
from metalab.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "prefetch.json"
DEFAULT_ARCHIVES = Path("data/raw")
FALLBACK_ARCHIVES = Path("../shared/data/omniglot")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archives",
        type=Path,
        default=None,
        help=f"directory with the two zips (default {DEFAULT_ARCHIVES}, else {FALLBACK_ARCHIVES})",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 105])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--load-repeats", type=int, default=3)
    return parser.parse_args()


def archive_directory(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    for candidate in (DEFAULT_ARCHIVES, FALLBACK_ARCHIVES):
        if all((candidate / f"{name}.zip").is_file() for name in ARCHIVE_NAMES):
            return candidate
    raise SystemExit(f"no Omniglot zips in {DEFAULT_ARCHIVES} or {FALLBACK_ARCHIVES}")


def benchmark_size(
    archives: dict[str, Path], image_size: int, workers: int, load_repeats: int, scratch: Path
) -> dict[str, float | int]:
    output = scratch / f"omniglot_{image_size}.npz"
    load_average = os.getloadavg()[0]
    summary = prefetch_omniglot(archives, image_size, output, workers=workers, progress=False)
    load_seconds = []
    for _ in range(load_repeats):
        started = time.perf_counter()
        loaded = load_prefetched(output)
        load_seconds.append(time.perf_counter() - started)
        del loaded
    row = {
        "image_size": image_size,
        "images": summary.images,
        "prefetch_seconds": round(summary.seconds, 3),
        "load_seconds": round(min(load_seconds), 4),
        "file_mb": round(output.stat().st_size / 2**20, 2),
        "workers": workers,
        "load_average_1min": round(load_average, 2),
    }
    output.unlink()
    return row


def main() -> None:
    arguments = parse_arguments()
    directory = archive_directory(arguments.archives)
    archives = {name: directory / f"{name}.zip" for name in ARCHIVE_NAMES}
    print(f"archives: {directory.resolve()}  cpus: {os.cpu_count()}  torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefetch-benchmark-") as scratch:
        for image_size in arguments.sizes:
            rows.append(
                benchmark_size(
                    archives, image_size, arguments.workers, arguments.load_repeats, Path(scratch)
                )
            )
            print(f"size {image_size}: done", flush=True)
    columns = list(rows[0])
    print(" | ".join(f"{column:>17}" for column in columns))
    for row in rows:
        print(" | ".join(f"{row[column]:>17}" for column in columns))
    write_json(RESULTS, rows)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
