"""Held-out evaluation speed: the per-episode loop against evaluation batched across episodes.

    python benchmarks/evaluation.py [--quick] [--rounds 3] [--threads 1] [--models maml,...]

Every way is `metalab.evaluation.evaluate_episode_set`, what the evaluate stage runs:
``loop`` (``batch_tasks=False``) adapts and predicts one episode at a time through
`Learner.adapt` (the loop every learner went through before `adapt_many`); ``batched``
hands a batching learner chunks of episodes, and a gradient learner scores before and
after adaptation from one call (`Learner.adapt_before_after`); ``separate`` (gradient
learners only) is ``batched`` with `MetaLearner.adapt_before_after`'s default, two
`adapt_many` calls (the batched path before ANIL, LEO and ANIL with a task encoder shared
their body features between the two). Each includes everything a stage does per episode: gathering
the images, adapting, predicting, and "before adaptation" for gradient learners.

Models are the experiments' networks with fresh weights (speed does not depend on
training) on real-shaped random data: 28x28 binary images with Omniglot-like ink (~20%),
in the four settings 5w1s, 5w5s, 20w1s, 20w5s with 15 queries per class:

    maml       MAML, Conv4 with stride-2 convolutions, 3 test-time steps (params.yaml `maml`)
    protonets  ProtoNets, max-pooling Conv4 (`protonets`)
    anil_s1    ANIL, max-pooling Conv4, head only, 10 test-time steps (`anil_s1`, `anil_s2`)
    anil_s3    ANIL, ResNet18, head only, 10 steps, zero head (`anil_s3` to `anil_s5`)
    generated_head  generated head weights (the seed's 'Meta Networks'), max-pooling
               Conv4 (`metanets`, `metanets_dropout`)
    leo        LEO over a max-pooling Conv4 (`leo`)
    reptile    Reptile, max-pooling Conv4, 10 test-time Adam steps on the whole support set
               (`reptile`)
    anil_task_encoder  ANIL with a task encoder (the seed's 'TAML'), Conv4 with stride-2
               convolutions, 3 steps (`taml_encoder`)

CAVIA does not batch tasks: evaluation adapts it one episode at a time either way.

Every model runs in its own process (its peak RSS is its own), with one torch thread by
default, as the evaluate stages run (``train.threads: 1``, two stages side by side).
Paired rounds, as ``benchmarks/throughput.py --paired``: in each round every way evaluates
the same episodes (``--chunks`` chunks' worth, default 2) one after the other, the order
rotating from round to round, so that the machine's slow spells hit all alike; the table
shows median episodes/s of each way and the median (quartiles) of the per-round time
ratios loop / batched and separate / batched. The overall ratio weights each (model,
setting) by its median per-episode time, as a stage evaluating the same number of
episodes per setting would. The machine's load average is recorded before and after each
model. Writes benchmarks/results/evaluation.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import MethodType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalab.algorithms.base import BuildContext, MetaLearner  # noqa: E402
from metalab.algorithms.registry import build_learner, options_class  # noqa: E402
from metalab.data.episodes import EpisodeIndex  # noqa: E402
from metalab.evaluation import episodes_per_call, evaluate_episode_set  # noqa: E402
from metalab.io import write_json  # noqa: E402
from metalab.learner_api import Learner  # noqa: E402
from metalab.models.config import ModelConfig  # noqa: E402
from metalab.runtime import cpu_model, keep_freed_memory, max_rss_mb  # noqa: E402

IMAGE_SIZE, QUERIES, TRAINED_WAYS = 28, 15, 5
SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
MODELS: dict[str, tuple[str, dict, dict]] = {
    "maml": ("maml", {"inner_lr": 0.4, "test_inner_steps": 3}, {"downsample": "stride"}),
    "protonets": ("protonets", {"train_n_way": 20}, {}),
    "anil_s1": (
        "maml",
        {"adapt_parameters": "head", "inner_lr": 0.5, "inner_steps": 5, "test_inner_steps": 10},
        {},
    ),
    "anil_s3": (
        "maml",
        {
            "adapt_parameters": "head",
            "inner_lr": 0.5,
            "inner_steps": 5,
            "test_inner_steps": 10,
            "head_init": "zeros",
        },
        {"name": "resnet18"},
    ),
    "generated_head": ("generated_head", {}, {}),
    "leo": ("leo", {}, {}),
    "reptile": (
        "reptile",
        {"inner_steps": 5, "inner_lr": 0.001, "test_inner_steps": 10, "epsilon_final": 0.0},
        {},
    ),
    "anil_task_encoder": (
        "anil_task_encoder",
        {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3},
        {"downsample": "stride"},
    ),
}
WAYS = ("loop", "separate", "batched")
IMAGES = 4000  # random drawings the episodes are drawn from


def make_learner(model: str) -> Learner:
    algorithm, options, network = MODELS[model]
    validated = options_class(algorithm).model_validate(options)
    context = BuildContext(model=ModelConfig(**network), n_way=TRAINED_WAYS, image_size=IMAGE_SIZE)
    torch.manual_seed(0)
    return Learner(build_learner(algorithm, validated, context), validated, TRAINED_WAYS, 28)


def random_images(seed: int = 0) -> torch.Tensor:
    """uint8 [IMAGES, 28, 28]: binary images with ~20% ink (255)."""
    generator = torch.Generator().manual_seed(seed)
    ink = torch.rand(IMAGES, IMAGE_SIZE, IMAGE_SIZE, generator=generator) < 0.2
    return ink.to(torch.uint8) * 255


def random_index(n_way: int, k_shot: int, tasks: int, seed: int) -> EpisodeIndex:
    """`tasks` N-way K-shot episodes of random images, 15 queries per class."""
    generator = torch.Generator().manual_seed(seed)
    shape = (tasks, n_way, k_shot + QUERIES)
    image_index = torch.randint(0, IMAGES, shape, generator=generator)
    zeros = torch.zeros(tasks, n_way, dtype=torch.int64)
    return EpisodeIndex(image_index, zeros, zeros, k_shot)


def separate_before_after(learner: Learner) -> Learner:
    """A copy of `learner` scoring before and after adaptation with two `adapt_many` calls
    (`MetaLearner.adapt_before_after`'s default), as the batched path did before sharing."""
    separate = copy.copy(learner)
    meta_learner = copy.deepcopy(learner.meta_learner)
    meta_learner.adapt_before_after = MethodType(MetaLearner.adapt_before_after, meta_learner)
    separate.meta_learner = meta_learner
    return separate


def measure_model(model: str, rounds: int, chunks_per_round: int) -> list[dict]:
    """Run in a worker process: per setting, `rounds` paired rounds of every way."""
    learner = make_learner(model)
    ways = {"loop": learner, "separate": separate_before_after(learner), "batched": learner}
    if not learner.adapts_by_gradient:
        del ways["separate"]  # nothing to score before adaptation
    images = random_images()
    rows = []
    for number, (setting, (n_way, k_shot)) in enumerate(SETTINGS.items()):
        probe = random_index(n_way, k_shot, 1, seed=number)
        tasks = chunks_per_round * episodes_per_call(probe)
        index = random_index(n_way, k_shot, tasks, seed=number)

        def run(way: str, index: EpisodeIndex = index, setting: str = setting) -> float:
            start = time.perf_counter()
            evaluate_episode_set(
                ways[way], images, index, setting, progress=False, batch_tasks=way != "loop"
            )
            return time.perf_counter() - start

        for way in ways:  # warm up every path
            run(way, index[: 1 if way == "loop" else episodes_per_call(probe)])
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        order = list(ways)
        for round_index in range(rounds):
            shift = round_index % len(order)
            for way in order[shift:] + order[:shift]:
                seconds[way].append(run(way))
        row = {
            "model": model,
            "setting": setting,
            "episodes_per_round": tasks,
            "episodes_per_call": episodes_per_call(probe),
            "rounds": rounds,
        }
        for way, times in seconds.items():
            row[f"{way}_episodes_per_s"] = round(tasks / statistics.median(times), 3)
            row[f"{way}_seconds_per_episode"] = statistics.median(times) / tasks
        for way in ("loop", "separate"):
            if way not in seconds:
                continue
            ratios = [t / b for t, b in zip(seconds[way], seconds["batched"], strict=True)]
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            prefix = "ratio" if way == "loop" else "sharing_ratio"
            row[f"{prefix}_median"] = round(statistics.median(ratios), 3)
            row[f"{prefix}_q1"] = round(quartiles[0], 3)
            row[f"{prefix}_q3"] = round(quartiles[-1], 3)
            row[f"{prefix}s"] = [round(ratio, 3) for ratio in ratios]
        rows.append(row)
        print(f"{model} {setting}: loop/batched {row['ratios']}", file=sys.stderr, flush=True)
    for row in rows:
        row["peak_rss_mb"] = round(max_rss_mb(), 1)
    return rows


def print_table(rows: list[dict]) -> None:
    """Episodes/s of each way and the median (quartiles) ratios to the batched path."""

    def ratio(row: dict, prefix: str) -> str:
        if f"{prefix}_median" not in row:
            return "-"
        return (
            f"{row[f'{prefix}_median']:.2f} ({row[f'{prefix}_q1']:.2f}-{row[f'{prefix}_q3']:.2f})"
        )

    header = (
        f"{'model':<10} {'setting':<7} {'loop ep/s':>10} {'separate':>9} {'batched':>8} "
        f"{'x loop (q1-q3)':>18} {'x separate (q1-q3)':>19} {'RSS MB':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        separate = row.get("separate_episodes_per_s")
        print(
            f"{row['model']:<10} {row['setting']:<7} {row['loop_episodes_per_s']:>10.2f} "
            f"{'-' if separate is None else f'{separate:.2f}':>9} "
            f"{row['batched_episodes_per_s']:>8.2f} {ratio(row, 'ratio'):>18} "
            f"{ratio(row, 'sharing_ratio'):>19} {row['peak_rss_mb']:>7.0f}"
        )


def overall_ratio(rows: list[dict], way: str = "loop") -> float:
    """Total per-episode time of `way` over that of the batched path, all rows that have
    `way`."""
    rows = [row for row in rows if f"{way}_seconds_per_episode" in row]
    total = sum(row[f"{way}_seconds_per_episode"] for row in rows)
    return total / sum(row["batched_seconds_per_episode"] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 1 chunk per setting")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/evaluation.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=2, help="adapt_many calls per round")
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        keep_freed_memory()
        print(json.dumps(measure_model(args.worker, args.rounds, args.chunks)))
        return
    rounds, chunks = (1, 1) if args.quick else (args.rounds, args.chunks)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    print(f"CPU: {cpu_model()}; {args.threads} thread(s) per worker", flush=True)
    rows = []
    for model in models:
        load_before = os.getloadavg()
        command = [sys.executable, __file__, "--worker", model, "--threads", str(args.threads)]
        command += ["--rounds", str(rounds), "--chunks", str(chunks)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        load = [round(value, 2) for value in (*load_before, *os.getloadavg())]
        for row in json.loads(result.stdout.strip().splitlines()[-1]):
            rows.append({**row, "threads": args.threads, "load_average_before_after": load})
        print(f"{model}: load average (1, 5, 15 min) before {load[:3]}, after {load[3:]}")
    overall, sharing = overall_ratio(rows), overall_ratio(rows, "separate")
    write_json(
        args.output,
        {
            "cpu": cpu_model(),
            "threads": args.threads,
            "overall_ratio": overall,
            "overall_sharing_ratio": sharing,
            "rows": rows,
        },
    )
    print_table(rows)
    print(
        f"overall (time-weighted over all rows): loop/batched {overall:.2f}x, separate/batched "
        f"{sharing:.2f}x (gradient learners); wrote {args.output}"
    )


if __name__ == "__main__":
    main()
