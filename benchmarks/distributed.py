"""Meta-training throughput across processes on the CPU: is torchrun worth it here?

    python benchmarks/distributed.py [--rounds 2] [--timed 3]

Config C1 as in benchmarks/throughput.py: MAML (second order, 1 inner step), 5-way 1-shot,
15 queries per class, 32 tasks per meta-batch, max-pooling Conv4 (64 channels) on 28x28
random binary images. A timed meta-iteration is what the train loop does per step under
torchrun: zero_grad, meta-gradients of this process's slice of the meta-batch, the
weighted all-reduce of gradients and statistics (`metalab.distributed`), an Adam step.

    1 x 1   one process, one thread (per-core baseline)
    1 x 2   one process, two intra-op threads
    2 x 1   torchrun --standalone --nproc_per_node=2, one thread each (gloo over loopback)

Every run is a fresh launch (its own peak RSS); with ``--rounds R`` the runs are repeated R
times, interleaved, and the best round counts. ``tasks_per_s`` is wall-clock on rank 0,
``cpu_tasks_per_s`` divides by the CPU seconds of all processes together (less sensitive to
other load on a shared machine), ``peak_rss_mb`` is the sum of the processes' peaks and
``allreduce_ms`` the time per iteration rank 0 spends in the all-reduce (including waiting
for the slower process). ``other_load`` is how many CPUs other programs kept busy on
average during the counted launch (from /proc/stat, minus this benchmark's own CPU time):
on a shared machine, read the wall-clock figures next to it. Rows are printed and written
to benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from throughput import print_table, random_episodes  # noqa: E402  (the same synthetic tasks)

from metalab.algorithms.base import TrainProgress  # noqa: E402
from metalab.algorithms.maml import MAMLLearner, Options  # noqa: E402
from metalab.distributed import (  # noqa: E402
    all_reduce_gradients,
    all_reduce_stats,
    broadcast_module,
    distributed_session,
)
from metalab.io import write_json  # noqa: E402
from metalab.models import Conv4  # noqa: E402
from metalab.runtime import max_rss_mb  # noqa: E402

N_WAY, IMAGE_SIZE, HIDDEN, TASKS = 5, 28, 64, 32  # random_episodes: 1 shot, 15 queries
RUNS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def measure(threads: int, warmup: int, timed: int) -> dict | None:
    """In each process of a run: time ``timed`` meta-iterations after ``warmup``.

    Returns the run's figures on rank 0, None elsewhere."""
    torch.set_num_threads(threads)
    with distributed_session() as context:
        torch.manual_seed(0)
        model = Conv4(N_WAY, IMAGE_SIZE, hidden=HIDDEN, downsample="maxpool")
        learner = MAMLLearner(model, N_WAY, Options(inner_lr=0.4))
        broadcast_module(learner)
        optimizer = torch.optim.Adam(learner.parameter_groups(), lr=1e-3)
        share = context.task_slice(TASKS)
        weight = context.task_weight(TASKS)
        episodes = random_episodes(TASKS)[share]  # every process draws all, keeps its slice
        reducing = 0.0

        def iteration(index: int) -> None:
            nonlocal reducing
            optimizer.zero_grad(set_to_none=True)
            stats = learner.meta_gradients(episodes, TrainProgress(index, 1000))
            started = time.perf_counter()
            if context.enabled:
                all_reduce_gradients(learner.parameters(), weight)
                all_reduce_stats(stats, weight)
            reducing += time.perf_counter() - started
            optimizer.step()

        for index in range(warmup):
            iteration(index)
        if context.enabled:
            dist.barrier()  # start the clock together
        reducing = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        for index in range(timed):
            iteration(warmup + index)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rss_mb = max_rss_mb()
        totals = torch.tensor([cpu, rss_mb], dtype=torch.float64)
        if context.enabled:
            dist.all_reduce(totals)  # CPU seconds and peak RSS of all processes together
        if not context.is_main:
            return None
        return {
            "processes": context.world_size,
            "threads_per_process": threads,
            "tasks_per_s": TASKS * timed / wall,
            "cpu_tasks_per_s": TASKS * timed / float(totals[0]),
            "peak_rss_mb": float(totals[1]),
            "allreduce_ms": 1000 * reducing / timed,
        }


def busy_cpu_seconds() -> float:
    """CPU seconds used so far by everything on this machine (Linux /proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (and theirs, e.g. torchrun's)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(processes: int, threads: int, warmup: int, timed: int) -> dict:
    """One run in fresh processes (torchrun for more than one); rank 0's figures, plus the
    CPUs other programs kept busy meanwhile (``other_load``)."""
    worker = [__file__, "--worker", "--threads", str(threads)]
    worker += ["--warmup", str(warmup), "--timed", str(timed)]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={processes}", *worker]
    environ = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started, busy, own = time.perf_counter(), busy_cpu_seconds(), children_cpu_seconds()
    result = subprocess.run(command, capture_output=True, text=True, env=environ)
    wall = time.perf_counter() - started
    others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - own)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return {**json.loads(lines[-1]), "other_load": max(0.0, others / wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/distributed.json")
    args = parser.parse_args()
    if args.worker:
        figures = measure(args.threads, args.warmup, args.timed)
        if figures is not None:
            print(json.dumps(figures), flush=True)
        return

    load_before = os.getloadavg()[0]
    best: dict[tuple[int, int], dict] = {}
    for round_index in range(args.rounds):
        for processes, threads in RUNS:
            measured = launch(processes, threads, args.warmup, args.timed)
            print(
                f"round {round_index + 1}: {processes} x {threads}: "
                f"{measured['tasks_per_s']:.2f} tasks/s (other load {measured['other_load']:.2f})",
                flush=True,
            )
            run = (processes, threads)
            if run not in best or measured["tasks_per_s"] > best[run]["tasks_per_s"]:
                best[run] = measured

    baseline = best[(1, 2)]["tasks_per_s"]
    rows = [
        {
            "config": "C1",
            "processes": processes,
            "threads_per_process": threads,
            "tasks_per_s": round(best[(processes, threads)]["tasks_per_s"], 3),
            "cpu_tasks_per_s": round(best[(processes, threads)]["cpu_tasks_per_s"], 3),
            "peak_rss_mb": round(best[(processes, threads)]["peak_rss_mb"], 1),
            "allreduce_ms": round(best[(processes, threads)]["allreduce_ms"], 2),
            "ratio_vs_1x2": round(best[(processes, threads)]["tasks_per_s"] / baseline, 3),
            "other_load": round(best[(processes, threads)]["other_load"], 2),
            "tasks": TASKS,
            "timed_iterations": args.timed,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "load_average_1min_before": round(load_before, 2),
        }
        for processes, threads in RUNS
    ]
    write_json(args.output, rows)

    print_table(
        rows,
        [
            ("config", "config", "<6"),
            ("processes", "procs", ">5d"),
            ("threads_per_process", "threads", ">7d"),
            ("tasks_per_s", "tasks/s", ">8.2f"),
            ("cpu_tasks_per_s", "cpu t/s", ">8.2f"),
            ("peak_rss_mb", "RSS MB", ">7.0f"),
            ("allreduce_ms", "allreduce ms", ">12.2f"),
            ("ratio_vs_1x2", "x 1x2", ">6.2f"),
            ("other_load", "other load", ">10.2f"),
        ],
    )
    print(f"load average before: {load_before:.2f} on {os.cpu_count()} CPUs; wrote {args.output}")


if __name__ == "__main__":
    main()
