"""What the C allocator settings cost or buy the meta-training step.

    python benchmarks/allocator.py [--rounds N] [--threads 1 2] [--iterations K] [--quick]

Every stage process calls `metalab.runtime.keep_freed_memory` (serve large blocks from the
heap, never trim it; it capped malloc at one arena until this benchmark showed the cap
slowed task-parallel threads). The settings are process-wide and must be made
before the first large allocation, so each setting is measured in processes of its own:
in every round, one fresh worker process per setting, started one after the other in an
order rotating from round to round, each timing K meta-iterations of the MAML fast path
(vectorised, channels-last, task-parallel threads) after a warmup. Ratios are per round
(``one-arena`` time / setting time, the same round: > 1 is faster), so a slow spell of
the shared machine hits neighbouring workers alike; median and quartiles over rounds.

Settings:

    glibc       glibc's defaults (no mallopt)
    one-arena   keep_freed_memory(arena_max=1): as the stages did until 2026-12-03
    kept        keep_freed_memory() as the stages call it: glibc's arena count

Configurations: the ``maml`` experiment's step (stride-2 Conv4, second order, 1 inner step,
5-way 1-shot, 15 queries, 16 tasks) and throughput.py's C1 (max-pool Conv4, 32 tasks),
at each ``--threads`` count. Prints a table and writes benchmarks/results/allocator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalab.algorithms.base import TrainProgress  # noqa: E402
from metalab.algorithms.maml import MAMLLearner, Options  # noqa: E402
from metalab.data.episodes import Episodes  # noqa: E402
from metalab.io import write_json  # noqa: E402
from metalab.models import Conv4  # noqa: E402
from metalab.runtime import cpu_model, keep_freed_memory, max_rss_mb  # noqa: E402

N_WAY, K_SHOT, QUERIES, IMAGE_SIZE = 5, 1, 15, 28
CONFIGS = {
    "maml (stride-2)": {"downsample": "stride", "tasks": 16},
    "C1 (max-pool)": {"downsample": "maxpool", "tasks": 32},
}
SETTINGS = ("glibc", "one-arena", "kept")
BASELINE = "one-arena"


def random_episodes(num_tasks: int) -> Episodes:
    generator = torch.Generator().manual_seed(0)

    def images(count: int) -> torch.Tensor:
        shape = (num_tasks, count, 1, IMAGE_SIZE, IMAGE_SIZE)
        return (torch.rand(shape, generator=generator) < 0.2).float()

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(num_tasks, 1)

    support = images(N_WAY * K_SHOT), labels(K_SHOT)
    return Episodes(*support, images(N_WAY * QUERIES), labels(QUERIES))


def measure(config: str, warmup: int, iterations: int) -> dict:
    """In a worker: seconds per meta-iteration (median of ``iterations``) and page faults."""
    spec = CONFIGS[config]
    torch.manual_seed(0)
    model = Conv4(N_WAY, IMAGE_SIZE, downsample=spec["downsample"])
    learner = MAMLLearner(model, N_WAY, Options(inner_lr=0.4, inner_steps=1))
    optimizer = torch.optim.Adam(learner.parameter_groups(), lr=1e-3)
    episodes = random_episodes(spec["tasks"])
    seconds = []
    faults = 0
    for index in range(warmup + iterations):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(episodes, TrainProgress(index, 1000))
        optimizer.step()
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {
        "seconds": statistics.median(seconds),
        "page_faults_per_iteration": faults / iterations,
        "peak_rss_mb": max_rss_mb(),
    }


def run_worker(setting: str, config: str, threads: int, warmup: int, iterations: int) -> None:
    if setting == "one-arena":
        keep_freed_memory(arena_max=1)
    elif setting == "kept":
        keep_freed_memory()
    torch.set_num_threads(threads)
    print(json.dumps(measure(config, warmup, iterations)))


def spawn(setting: str, config: str, threads: int, warmup: int, iterations: int) -> dict:
    command = [sys.executable, __file__, "--worker", setting, "--config", config]
    command += ["--threads", str(threads), "--warmup", str(warmup), "--iterations", str(iterations)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=6, help="timed per worker")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 iterations")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/allocator.json")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.config, args.threads[0], args.warmup, args.iterations)
        return
    if args.quick:
        args.rounds, args.iterations, args.warmup = 2, 2, 1
    rows = []
    load_before = os.getloadavg()[0]
    for config in CONFIGS:
        for threads in args.threads:
            measured: dict[str, list[dict]] = {s: [] for s in SETTINGS}
            for round_index in range(args.rounds):
                for offset in range(len(SETTINGS)):
                    setting = SETTINGS[(round_index + offset) % len(SETTINGS)]
                    measured[setting].append(
                        spawn(setting, config, threads, args.warmup, args.iterations)
                    )
            tasks = CONFIGS[config]["tasks"]
            for setting in SETTINGS:
                own_runs = measured[setting]
                own = [m["seconds"] for m in own_runs]
                base = [m["seconds"] for m in measured[BASELINE]]
                ratios = [b / o for b, o in zip(base, own, strict=True)]
                quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                rows.append(
                    {
                        "config": config,
                        "threads": threads,
                        "setting": setting,
                        "tasks_per_s": round(tasks / statistics.median(own), 2),
                        "speed_vs_one_arena_median": round(statistics.median(ratios), 3),
                        "speed_vs_one_arena_q1": round(quartiles[0], 3),
                        "speed_vs_one_arena_q3": round(quartiles[-1], 3),
                        "page_faults_per_iteration": round(
                            statistics.median(m["page_faults_per_iteration"] for m in own_runs)
                        ),
                        "peak_rss_mb": round(max(m["peak_rss_mb"] for m in own_runs)),
                    }
                )
                row = rows[-1]
                print(
                    f"{config:16} {threads:>2} thr  {setting:7} {row['tasks_per_s']:7.2f} tasks/s"
                    f"  x{row['speed_vs_one_arena_median']:.3f} ({row['speed_vs_one_arena_q1']:.3f}"
                    f"-{row['speed_vs_one_arena_q3']:.3f})"
                    f"  faults/it {row['page_faults_per_iteration']:>8}"
                    f"  peak {row['peak_rss_mb']} MB",
                    flush=True,
                )
    result = {
        "benchmark": "allocator",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "rounds": args.rounds,
        "iterations_per_worker": args.iterations,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
