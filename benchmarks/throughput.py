"""Meta-training throughput of the MAML-family core: vectorised vs a plain per-task loop.

    python benchmarks/throughput.py [--quick] [--threads 2] [--rounds 2]

Every (config, variant, precision) runs in its own subprocess (so that its peak RSS is its
own): a few warmup meta-iterations, then timed ones, each = zero_grad + meta_gradients +
Adam step on a fixed random meta-batch. Configs share 5-way 1-shot, 15 queries per class,
32 tasks per meta-batch and a max-pooling Conv4 (64 channels) on 28x28 images:

    C1       MAML, second order, 1 inner step
    C1-FO    first-order MAML, 1 inner step
    MAML-5   MAML, second order, 5 inner steps
    ANIL-5   ANIL, second order, 5 inner steps (head only)

Variants: ``loop`` = the plain per-task loop (functional_call of the nn.Module, NCHW,
``vectorise_tasks: false``), the baseline of ``ratio_vs_loop``; ``vectorised`` = the
default fast path (grouped convolutions over chunks of 2 tasks, channels_last, the chunks
shared between the torch threads, ``task_parallel``); ``vectorised-serial`` the same with
every kernel split between the threads instead (``task_parallel: false``);
``vectorised-chunkN`` N tasks per pass (for tuning ``task_chunk_size``). Every process
reuses freed memory as the stages do (`metalab.runtime.keep_freed_memory`), except
``loop-glibc-default`` and ``vectorised-glibc-default``, which show what the C allocator's
defaults cost (``page_faults_per_iteration``).

Rows are printed as a table and written to benchmarks/results/throughput.json, with the
CPU's model and bf16 support (AMX / AVX512-BF16 decide whether bf16 pays off);
``cpu_tasks_per_s`` (tasks per CPU-second of the process) is less sensitive to other load
on the machine than wall-clock ``tasks_per_s``. With ``--rounds R`` the subprocesses run R
times, interleaved, and the best round counts; ``tasks_per_s_rounds`` keeps every round's
value (the printed ``spread`` is max/min - 1), because run-to-run noise on a shared
machine can exceed the differences being measured. A cheap bf16 check (meta-gradient cosine
similarity to fp32 on one meta-batch) goes to benchmarks/results/throughput_bf16_check.json.

``--paired N`` measures the targets' ratios differently: one process per comparison builds
the baseline and its contenders side by side and times one meta-iteration of each in turn,
N rounds (the order rotating every round), so that the machine's slow swings hit every
variant of a round alike. It reports the median and quartiles of the per-round ratios (and
the ratio of the best times) in benchmarks/results/throughput_paired.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalab.algorithms.base import TrainProgress  # noqa: E402
from metalab.algorithms.maml import MAMLLearner, Options  # noqa: E402
from metalab.data.episodes import Episodes  # noqa: E402
from metalab.io import write_json  # noqa: E402
from metalab.models import Conv4  # noqa: E402
from metalab.runtime import cpu_flags, cpu_model, keep_freed_memory, max_rss_mb  # noqa: E402

N_WAY, K_SHOT, QUERIES, IMAGE_SIZE, HIDDEN = 5, 1, 15, 28, 64
CONFIGS: dict[str, dict] = {
    "C1": {},
    "C1-FO": {"first_order": True},
    "MAML-5": {"inner_steps": 5},
    "ANIL-5": {"inner_steps": 5, "adapt_parameters": "head"},
}
LOOP = {"vectorise_tasks": False, "channels_last": False}
VARIANTS: dict[str, dict] = {
    "loop": LOOP,
    "loop-glibc-default": LOOP,
    "vectorised": {},  # the defaults: task_chunk_size 2, channels_last, task_parallel
    "vectorised-glibc-default": {},
    "vectorised-serial": {"task_parallel": False},
    "vectorised-chunk1": {"task_chunk_size": 1},
    "vectorised-chunk4": {"task_chunk_size": 4},
}
RUNS = [
    ("C1", "loop", "fp32"),
    ("C1", "loop-glibc-default", "fp32"),
    ("C1", "vectorised", "fp32"),
    ("C1", "vectorised", "bf16"),
    ("C1", "vectorised-glibc-default", "fp32"),
    ("C1", "vectorised-serial", "fp32"),
    ("C1", "vectorised-serial", "bf16"),
    ("C1", "vectorised-chunk1", "fp32"),
    ("C1", "vectorised-chunk4", "fp32"),
    ("C1", "vectorised-chunk4", "bf16"),
    ("C1-FO", "loop", "fp32"),
    ("C1-FO", "vectorised", "fp32"),
    ("MAML-5", "loop", "fp32"),
    ("MAML-5", "vectorised", "fp32"),
    ("MAML-5", "vectorised", "bf16"),
    ("ANIL-5", "loop", "fp32"),
    ("ANIL-5", "vectorised", "fp32"),
    ("ANIL-5", "vectorised", "bf16"),
]

# Paired comparisons: the baseline first, then its contenders (the targets).
PAIRED: dict[str, list[tuple[str, str, str]]] = {
    "C1": [("C1", "loop", "fp32"), ("C1", "vectorised", "fp32"), ("C1", "vectorised", "bf16")],
    "ANIL-5 vs MAML-5": [
        ("MAML-5", "loop", "fp32"),
        ("ANIL-5", "vectorised", "fp32"),
        ("ANIL-5", "vectorised", "bf16"),
    ],
}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; columns: (row key, header, format spec such as
    ">8.2f"); headers take the spec's alignment and width."""
    widths = [(spec[0], spec[1:].split(".")[0].rstrip("df")) for _, _, spec in columns]
    header = " ".join(
        f"{title:{align}{width}}"
        for (_, title, _), (align, width) in zip(columns, widths, strict=True)
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(" ".join(f"{row[key]:{spec}}" for key, _, spec in columns))


def random_episodes(num_tasks: int, seed: int = 0) -> Episodes:
    """Binary images with Omniglot-like ink density (~20%), labels class-major."""
    generator = torch.Generator().manual_seed(seed)

    def images(count: int) -> torch.Tensor:
        shape = (num_tasks, count, 1, IMAGE_SIZE, IMAGE_SIZE)
        return (torch.rand(shape, generator=generator) < 0.2).float()

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(num_tasks, 1)

    return Episodes(
        images(N_WAY * K_SHOT), labels(K_SHOT), images(N_WAY * QUERIES), labels(QUERIES)
    )


def make_learner(config: str, variant: str, precision: str) -> MAMLLearner:
    torch.manual_seed(0)
    options = Options(inner_lr=0.4, **CONFIGS[config], **VARIANTS[variant])
    model = Conv4(N_WAY, IMAGE_SIZE, hidden=HIDDEN, downsample="maxpool")
    return MAMLLearner(model, N_WAY, options, precision=precision)


def make_stepper(
    config: str, variant: str, precision: str, episodes: Episodes
) -> Callable[[int], None]:
    """One meta-iteration (zero_grad + meta_gradients + Adam step) on ``episodes``, as a
    function of the iteration index."""
    learner = make_learner(config, variant, precision)
    optimizer = torch.optim.Adam(learner.parameter_groups(), lr=1e-3)

    def iteration(index: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(episodes, TrainProgress(index, 1000))
        optimizer.step()

    return iteration


def measure(config: str, variant: str, precision: str, tasks: int, warmup: int, timed: int) -> dict:
    """Run in a worker process: tasks/s over ``timed`` meta-iterations after ``warmup``."""
    iteration = make_stepper(config, variant, precision, random_episodes(tasks))
    for index in range(warmup):
        iteration(index)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(timed):
        iteration(warmup + index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tasks_per_s": tasks * timed / wall,
        "cpu_tasks_per_s": tasks * timed / cpu,
        "peak_rss_mb": max_rss_mb(),
        "page_faults_per_iteration": (usage.ru_minflt - faults) / timed,
    }


def measure_paired(group: str, tasks: int, warmup: int, rounds: int) -> list[dict]:
    """Run in a worker process: every run of ``PAIRED[group]`` side by side, one timed
    meta-iteration each per round, and each contender's per-round time ratio to the
    baseline (the group's first run)."""
    runs = PAIRED[group]
    episodes = random_episodes(tasks)
    steppers = [make_stepper(*run, episodes) for run in runs]
    for iteration in steppers:
        for index in range(warmup):
            iteration(index)
    seconds: list[list[float]] = [[] for _ in runs]
    for round_index in range(rounds):
        for offset in range(len(runs)):
            which = (round_index + offset) % len(runs)
            start = time.perf_counter()
            steppers[which](warmup + round_index)
            seconds[which].append(time.perf_counter() - start)
    rows = []
    for (config, variant, precision), times in zip(runs[1:], seconds[1:], strict=True):
        ratios = [base / own for base, own in zip(seconds[0], times, strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        rows.append(
            {
                "group": group,
                "config": config,
                "variant": variant,
                "precision": precision,
                "baseline": "/".join(runs[0]),
                "rounds": rounds,
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_q1": round(quartiles[0], 3),
                "ratio_q3": round(quartiles[-1], 3),
                "ratio_of_best": round(min(seconds[0]) / min(times), 3),
                "ratios": [round(r, 3) for r in ratios],
                "tasks_per_s_median": round(tasks / statistics.median(times), 3),
                "baseline_tasks_per_s_median": round(tasks / statistics.median(seconds[0]), 3),
            }
        )
    return rows


def cpu_description() -> dict:
    """The CPU's model name and the bf16-relevant instruction sets it advertises."""
    flags = cpu_flags() or frozenset()
    return {
        "model": cpu_model(),
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
    }


def bf16_gradient_check(tasks: int) -> dict:
    """Cosine similarity of bf16 and fp32 C1 meta-gradients on one meta-batch."""
    episodes = random_episodes(tasks, seed=1)
    grads, losses = [], []
    for precision in ("fp32", "bf16"):
        learner = make_learner("C1", "vectorised", precision)
        stats = learner.meta_gradients(episodes, TrainProgress(0, 1000))
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()]))
        losses.append(stats.loss)
    return {
        "config": "C1",
        "tasks": tasks,
        "gradient_cosine_similarity": float(torch.nn.functional.cosine_similarity(*grads, dim=0)),
        "relative_gradient_error": float((grads[1] - grads[0]).norm() / grads[0].norm()),
        "query_loss_fp32": losses[0],
        "query_loss_bf16": losses[1],
    }


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.worker == "bf16-check":
        print(json.dumps(bf16_gradient_check(args.tasks)))
        return
    if args.worker.startswith("paired:"):
        keep_freed_memory()
        group = args.worker.removeprefix("paired:")
        print(json.dumps(measure_paired(group, args.tasks, args.warmup, args.timed)))
        return
    config, variant, precision = args.worker.split(",")
    if not variant.endswith("glibc-default"):
        keep_freed_memory()
    print(json.dumps(measure(config, variant, precision, args.tasks, args.warmup, args.timed)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 tasks, 1 warmup, 1 timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument(
        "--paired", type=int, metavar="N", help="only the paired target ratios, N rounds"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    tasks, warmup, timed = (8, 1, 1) if args.quick else (32, 1, 3)

    def spawn(worker: str, timed: int = timed) -> dict | list:
        command = [sys.executable, __file__, "--worker", worker, "--threads", str(args.threads)]
        command += ["--tasks", str(tasks), "--warmup", str(warmup), "--timed", str(timed)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; bf16 instructions: {', '.join(cpu['bf16_flags']) or 'none'}")
    if args.paired:
        run_paired(args, spawn, tasks, cpu)
        return
    best: dict[tuple[str, str, str], dict] = {}
    every_round: dict[tuple[str, str, str], list[float]] = {run: [] for run in RUNS}
    for round_index in range(args.rounds):
        for run in RUNS:
            measured = spawn(",".join(run))
            print(
                f"round {round_index + 1}: {run} {measured['tasks_per_s']:.2f} tasks/s", flush=True
            )
            every_round[run].append(round(measured["tasks_per_s"], 3))
            if run not in best or measured["tasks_per_s"] > best[run]["tasks_per_s"]:
                best[run] = measured

    rows = []
    for config, variant, precision in RUNS:
        baseline = best[(config, "loop", "fp32")]
        measured = best[(config, variant, precision)]
        rounds = every_round[(config, variant, precision)]
        rows.append(
            {
                "config": config,
                "variant": variant,
                "precision": precision,
                "tasks_per_s": round(measured["tasks_per_s"], 3),
                "tasks_per_s_rounds": rounds,
                "spread": round(max(rounds) / min(rounds) - 1, 3),
                "cpu_tasks_per_s": round(measured["cpu_tasks_per_s"], 3),
                "peak_rss_mb": round(measured["peak_rss_mb"], 1),
                "ratio_vs_loop": round(measured["tasks_per_s"] / baseline["tasks_per_s"], 3),
                "cpu_ratio_vs_loop": round(
                    measured["cpu_tasks_per_s"] / baseline["cpu_tasks_per_s"], 3
                ),
                "page_faults_per_iteration": round(measured["page_faults_per_iteration"]),
                "tasks": tasks,
                "threads": args.threads,
                "cpu": cpu,
            }
        )
    maml5_loop = best[("MAML-5", "loop", "fp32")]
    write_json(args.output, rows)
    check = spawn("bf16-check")
    check_path = args.output.with_name(args.output.stem + "_bf16_check.json")
    write_json(check_path, check)

    print_table(
        rows,
        [
            ("config", "config", "<8"),
            ("variant", "variant", "<17"),
            ("precision", "prec", "<5"),
            ("tasks_per_s", "tasks/s", ">8.2f"),
            ("cpu_tasks_per_s", "cpu t/s", ">8.2f"),
            ("peak_rss_mb", "RSS MB", ">8.0f"),
            ("ratio_vs_loop", "x loop", ">7.2f"),
            ("cpu_ratio_vs_loop", "cpu x", ">6.2f"),
            ("page_faults_per_iteration", "faults/it", ">9d"),
            ("spread", "spread", ">6.0%"),
        ],
    )
    for precision in ("fp32", "bf16"):
        anil = best[("ANIL-5", "vectorised", precision)]
        maml5 = best[("MAML-5", "vectorised", precision)]
        print(
            f"ANIL-5 vectorised {precision} vs MAML-5 vectorised {precision}: "
            f"{anil['tasks_per_s'] / maml5['tasks_per_s']:.2f}x, "
            f"vs MAML-5 loop fp32: {anil['tasks_per_s'] / maml5_loop['tasks_per_s']:.2f}x "
            f"(cpu: {anil['cpu_tasks_per_s'] / maml5_loop['cpu_tasks_per_s']:.2f}x)"
        )
    print(
        f"bf16 vs fp32 C1 meta-gradient: cosine {check['gradient_cosine_similarity']:.4f}, "
        f"relative error {check['relative_gradient_error']:.3f}"
    )
    print(f"wrote {args.output} and {check_path}")


def run_paired(args: argparse.Namespace, spawn: Callable, tasks: int, cpu: dict) -> None:
    """``--paired N``: each comparison of ``PAIRED`` in its own process, N rounds."""
    rows = []
    for group in PAIRED:
        measured = spawn(f"paired:{group}", timed=args.paired)
        for row in measured:
            print(
                f"{group}: {row['config']} {row['variant']} {row['precision']} "
                f"ratios {', '.join(f'{r:.2f}' for r in row['ratios'])}",
                flush=True,
            )
        rows += [{**row, "tasks": tasks, "threads": args.threads, "cpu": cpu} for row in measured]
    output = args.output.with_name(args.output.stem + "_paired.json")
    write_json(output, rows)
    print_table(
        rows,
        [
            ("config", "config", "<8"),
            ("variant", "variant", "<11"),
            ("precision", "prec", "<5"),
            ("baseline", "baseline", "<18"),
            ("tasks_per_s_median", "tasks/s", ">8.2f"),
            ("ratio_median", "x median", ">9.2f"),
            ("ratio_q1", "x q1", ">6.2f"),
            ("ratio_q3", "x q3", ">6.2f"),
            ("ratio_of_best", "x best", ">7.2f"),
        ],
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
