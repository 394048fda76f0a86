"""Whole train stages: one at a time on every core, or one per core side by side?

    python benchmarks/stage_parallelism.py [--data DIR] [--fraction 0.25] [--jobs 2]

Decides how `dvc repro` should use a machine's cores. Runs real ``stages/train.py``
processes (start-up, data loading, validation and checkpoints included) for a mix of
experiments, each at `--fraction` of its params.yaml budget (iterations and validation
interval), in two ways, one after the other in this one command:

    sequential   one stage at a time with ``train.threads`` = `--jobs`
                 (what plain ``dvc repro`` does when the stages use every core)
    side_by_side `--jobs` stages at once at one thread each
                 (what ``metalab-repro`` does with the committed ``train.threads: 1``)

Each stage runs in its own scratch directory with this project's params.yaml (scaled) and
code, the data symlinked from `--data` (a ``data/`` folder holding ``prefetched/`` from the
prefetch stage; default: this project's), MLflow off, so nothing in the project changes.
Prints per-stage seconds and both makespans; writes benchmarks/results/stage_parallelism.json
with the CPU's model.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
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


def run_mode(data: Path, params: dict, names: list[str], jobs: int, scratch: Path) -> dict:
    """Run every stage with `jobs` at once; per-stage seconds and the makespan."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        seconds = dict(
            zip(
                names,
                pool.map(lambda n: run_stage(data, params, n, scratch), names),
                strict=True,
            )
        )
    return {"stage_seconds": seconds, "makespan_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="holds prefetched/")
    parser.add_argument("--fraction", type=float, default=0.25, help="of each budget")
    parser.add_argument("--jobs", type=int, default=2, help="cores to use")
    parser.add_argument("--experiments", nargs="+", default=DEFAULT_EXPERIMENTS)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks/results/stage_parallelism.json"
    )
    args = parser.parse_args()
    data = args.data.resolve()
    if not (data / "prefetched").is_dir():
        print(f"error: {data}/prefetched missing; run `dvc repro prefetch`", file=sys.stderr)
        sys.exit(1)
    raw = read_params_file(ROOT / "params.yaml")
    names = list(args.experiments)
    scratch = Path(tempfile.mkdtemp(prefix="stage-parallelism-"))
    try:
        sequential = run_mode(
            data, scaled_params(raw, names, args.fraction, args.jobs), names, 1, scratch
        )
        side_by_side = run_mode(
            data, scaled_params(raw, names, args.fraction, 1), names, args.jobs, scratch
        )
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(error.cmd[1:])} failed: {error.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ratio = sequential["makespan_s"] / side_by_side["makespan_s"]
    print(f"{'experiment':<12} {'sequential':>11} {'side by side':>13}   (seconds per stage)")
    for name in names:
        print(
            f"{name:<12} {sequential['stage_seconds'][name]:>11.1f} "
            f"{side_by_side['stage_seconds'][name]:>13.1f}"
        )
    print(
        f"{'makespan':<12} {sequential['makespan_s']:>11.1f} {side_by_side['makespan_s']:>13.1f}"
        f"   sequential / side by side = {ratio:.2f}"
    )
    write_json(
        args.output,
        {
            "cpu": cpu_model(),
            "cores_used": args.jobs,
            "fraction_of_budget": args.fraction,
            "sequential": {"threads_per_stage": args.jobs, "stages_at_once": 1, **sequential},
            "side_by_side": {"threads_per_stage": 1, "stages_at_once": args.jobs, **side_by_side},
            "sequential_over_side_by_side": ratio,
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
