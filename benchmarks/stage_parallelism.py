"""Whole train stages: one at a time on every core, or one per core side by side?

    python benchmarks/stage_parallelism.py [--data DIR] [--fraction 0.25]

Decides how `dvc repro` should use a machine's cores. Runs real ``stages/train.py``
processes (start-up, data loading, validation and checkpoints included) for a mix of
experiments, each at `--fraction` of its params.yaml budget (iterations and validation
interval), two by two, each pair both ways right after each other (so that a shared
machine's slow swings hit both alike):

    sequential   one stage after the other with ``train.threads: 2``
                 (what plain ``dvc repro`` does when the stages use both cores)
    side_by_side both stages at once at one thread each
                 (what ``metalab-repro`` does with the committed ``train.threads: 1``)

Each stage runs in its own scratch directory with this project's params.yaml (scaled) and
code, the data symlinked from `--data` (a ``data/`` folder holding ``prefetched/`` from the
prefetch stage; default: this project's), MLflow off, so nothing in the project changes.
Prints each pair's two wall times and the totals; writes
benchmarks/results/stage_parallelism.json with the CPU's model and the load average seen.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalab.io import write_json  # noqa: E402
from metalab.runtime import cpu_model  # noqa: E402
from metalab.schema import ANCHOR_PREFIX, read_params_file  # noqa: E402

# One or two per family, all starting from a random body (no pretrain stage needed).
DEFAULT_EXPERIMENTS = [
    "maml",
    "fomaml",
    "anil_s2",
    "reptile",
    "cavia",
    "protonets",
    "metanets",
    "leo",
]


def scaled_params(raw: dict, names: list[str], fraction: float, threads: int) -> dict:
    """`raw` params with only `names`, each at `fraction` of its budget, `threads` each."""
    params = copy.deepcopy({k: v for k, v in raw.items() if not k.startswith(ANCHOR_PREFIX)})
    params["experiments"] = {name: params["experiments"][name] for name in names}
    params["rl_experiments"] = {}
    report = params.get("report", {})
    report["pairs"] = [pair for pair in report.get("pairs", []) if set(pair) <= set(names)]
    params.setdefault("tracking", {})["enabled"] = False
    defaults = params["train"]
    for experiment in params["experiments"].values():
        train = {k: v for k, v in (experiment.get("train") or {}).items() if v is not None}
        iterations = max(1, round(train.get("iterations", defaults["iterations"]) * fraction))
        every = train.get("validate_every", defaults["validate_every"])
        train.update(
            iterations=iterations,
            validate_every=max(1, min(iterations, round(every * fraction))),
            checkpoint_every=iterations,
            threads=threads,
        )
        experiment["train"] = train
    return params


def run_stage(data: Path, params: dict, name: str, scratch: Path) -> float:
    """Wall seconds of ``stages/train.py <name>`` in a fresh directory under `scratch`."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    (work / "data").symlink_to(data)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), name, "--no-progress"],
        cwd=work,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "METALAB_DEVICE": "cpu"},
    )
    return time.perf_counter() - started


def run_pair(
    data: Path, params: dict[int, dict], pair: list[str], jobs: int, scratch: Path
) -> dict:
    """The two stages of `pair` both ways: one after the other at `jobs` threads each
    (sequential), and side by side at one thread each. Returns both wall times."""
    started = time.perf_counter()
    for name in pair:
        run_stage(data, params[jobs], name, scratch)
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(pair)) as pool:
        list(pool.map(lambda name: run_stage(data, params[1], name, scratch), pair))
    side_by_side = time.perf_counter() - started
    return {"pair": pair, "sequential_s": sequential, "side_by_side_s": side_by_side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="holds prefetched/")
    parser.add_argument("--fraction", type=float, default=0.25, help="of each budget")
    parser.add_argument("--experiments", nargs="+", default=DEFAULT_EXPERIMENTS)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks/results/stage_parallelism.json"
    )
    args = parser.parse_args()
    jobs = 2
    data = args.data.resolve()
    if not (data / "prefetched").is_dir():
        print(f"error: {data}/prefetched missing; run `dvc repro prefetch`", file=sys.stderr)
        sys.exit(1)
    if len(args.experiments) % jobs:
        print(
            f"error: --experiments needs an even count, got {len(args.experiments)}",
            file=sys.stderr,
        )
        sys.exit(2)
    raw = read_params_file(ROOT / "params.yaml")
    names = list(args.experiments)
    params = {t: scaled_params(raw, names, args.fraction, t) for t in (1, jobs)}
    pairs = [names[i : i + jobs] for i in range(0, len(names), jobs)]
    scratch = Path(tempfile.mkdtemp(prefix="stage-parallelism-"))
    rows = []
    try:
        for pair in pairs:
            rows.append(run_pair(data, params, pair, jobs, scratch))
            rows[-1]["load_average_1min"] = os.getloadavg()[0]
            row = rows[-1]
            print(
                f"{' + '.join(pair):<22} sequential {row['sequential_s']:6.1f} s   "
                f"side by side {row['side_by_side_s']:6.1f} s   "
                f"ratio {row['sequential_s'] / row['side_by_side_s']:.2f}",
                flush=True,
            )
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(error.cmd[1:])} failed: {error.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sequential = sum(row["sequential_s"] for row in rows)
    side_by_side = sum(row["side_by_side_s"] for row in rows)
    ratios = [row["sequential_s"] / row["side_by_side_s"] for row in rows]
    print(
        f"{'all':<22} sequential {sequential:6.1f} s   side by side {side_by_side:6.1f} s   "
        f"ratio {sequential / side_by_side:.2f} (pairs: median {statistics.median(ratios):.2f})"
    )
    write_json(
        args.output,
        {
            "cpu": cpu_model(),
            "cores_used": jobs,
            "fraction_of_budget": args.fraction,
            "pairs": rows,
            "sequential_s": sequential,
            "side_by_side_s": side_by_side,
            "sequential_over_side_by_side": sequential / side_by_side,
            "median_pair_ratio": statistics.median(ratios),
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
