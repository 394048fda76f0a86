"""How long the full pipeline takes one stage at a time and with `metalab-repro -j N`.

    python benchmarks/pipeline_time.py --pretrain-seconds S [--startup-seconds 10] [--jobs 2]

Computed, not run: the project's real stage graph (from DVC) is put through the real
scheduler (`metalab.repro.schedule`), each stage "running" for its measured duration,
scaled down 1000x. Durations:

- train@, evaluate@, train_rl@: the committed metrics of the last full run
  (``training_seconds``, ``evaluation_seconds``), measured with two train stages side by
  side at one thread each, the way `metalab-repro -j 2` runs them;
- prefetch: ``seconds`` in metrics/prefetch.json;
- pretrain: ``--pretrain-seconds``, measured (``time python stages/pretrain.py``);
- every stage also pays ``--startup-seconds``: DVC's check and the Python imports of one
  ``dvc repro --single-item`` process, measured on tiny stages (metalab-smoke);
- download, episodes, evaluate_rl@ and report do little beyond that start-up:
  ``--small-stage-seconds`` each (also measured on the smoke run).

Prints both totals and the speed-up, writes benchmarks/results/pipeline_time.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalab.io import write_json  # noqa: E402
from metalab.repro import Pipeline, read_pipeline, schedule  # noqa: E402
from metalab.runtime import cpu_model  # noqa: E402

SCALE = 1e-3  # simulated seconds per real second


def work_seconds(project: Path, stage: str, args: argparse.Namespace) -> float:
    """Seconds of work (beyond start-up) of `stage`, from the committed metrics."""
    kind, _, name = stage.partition("@")
    experiment, _, seed = name.rpartition("-")  # train_rl@<name>-<seed>: a seed's run
    files = {
        "train": (f"metrics/train/{name}.json", "training_seconds"),
        "evaluate": (f"metrics/eval/{name}.json", "evaluation_seconds"),
        "train_rl": (f"metrics/train_rl/{experiment}-s{seed}.json", "training_seconds"),
        "prefetch": ("metrics/prefetch.json", "seconds"),
    }
    if kind == "pretrain":
        return args.pretrain_seconds
    if kind not in files:
        return args.small_stage_seconds - args.startup_seconds
    path, key = files[kind]
    return float(json.loads((project / path).read_text())[key])


def makespan(pipeline: Pipeline, seconds: dict[str, float], jobs: int) -> float:
    """Simulated wall seconds of the whole pipeline with `jobs` stages at once."""
    started = time.perf_counter()
    schedule(pipeline, lambda stage: time.sleep(seconds[stage] * SCALE) or True, jobs)
    return (time.perf_counter() - started) / SCALE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--pretrain-seconds", type=float, required=True)
    parser.add_argument("--startup-seconds", type=float, default=10.0)
    parser.add_argument("--small-stage-seconds", type=float, default=12.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks/results/pipeline_time.json"
    )
    args = parser.parse_args()
    graph = read_pipeline(args.project.resolve())
    pipeline = Pipeline(graph.upstream, set(graph.upstream), graph.commands)  # all out of date
    seconds = {
        stage: args.startup_seconds + work_seconds(args.project, stage, args)
        for stage in pipeline.upstream
    }
    one_at_a_time = sum(seconds.values())
    side_by_side = makespan(pipeline, seconds, args.jobs)
    print(f"{len(seconds)} stages, {one_at_a_time / 60:.0f} min of stage time")
    print(f"dvc repro (one stage at a time):    {one_at_a_time / 60:6.1f} min")
    print(f"metalab-repro -j {args.jobs}:                {side_by_side / 60:6.1f} min")
    print(f"speed-up: {one_at_a_time / side_by_side:.2f}x")
    write_json(
        args.output,
        {
            "cpu": cpu_model(),
            "computed_from": "committed metrics of the last full run + measured start-up/pretrain",
            "startup_seconds": args.startup_seconds,
            "pretrain_seconds": args.pretrain_seconds,
            "small_stage_seconds": args.small_stage_seconds,
            "jobs": args.jobs,
            "one_at_a_time_minutes": one_at_a_time / 60,
            "metalab_repro_minutes": side_by_side / 60,
            "stage_seconds": seconds,
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
