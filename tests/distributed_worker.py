"""One process of the two-process gloo run in test_distributed.py.

The test starts two of these with torchrun's environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so
the process group is set up exactly as under ``torchrun``:

    python tests/distributed_worker.py OUTPUT_DIR PREFETCHED_NPZ

Each process checks the weighted all-reduce on hand-made gradients, trains the tiny
experiments of `experiment_params` (and one interrupted and resumed run), and saves what it
saw to ``OUTPUT_DIR/rank<r>.pt`` for the test to compare with a single-process run.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalab.algorithms.base import StepStats
from metalab.data.prefetch import OmniglotArrays, load_prefetched
from metalab.data.splits import Split, make_split
from metalab.distributed import (
    DistributedContext,
    all_reduce_gradients,
    all_reduce_stats,
    init_distributed,
    shutdown_distributed,
)
from metalab.params import Params, validate_params
from metalab.training import Trainer

# Three tasks on two processes: slices of 2 and 1 tasks, so the weighting is exercised.
META_BATCH_SIZE = 3
ITERATIONS = 4
EXPERIMENTS = ("maml", "proto")


def experiment_params() -> Params:
    """Tiny 3-way 1-shot runs of MAML (second order, stride Conv4) and ProtoNets, no dropout.

    SGD rather than Adam: Adam divides each gradient by its own magnitude, so parameters
    whose gradient is mathematically zero (conv biases in front of BatchNorm; in ProtoNets
    also a last-block BatchNorm bias that shifts every embedding alike) turn float rounding
    noise, which depends on the summation order, into steps of size ~lr (measured: ~5e-3
    after 4 steps at lr 1e-3 there, while every other parameter agreed to ~3e-7). Under SGD
    that noise moves them by lr x noise: the first conv bias of ProtoNets differed by 7e-6 at
    lr 0.1 (every other parameter by at most 1.2e-6), hence a small lr.
    """
    return validate_params(
        {
            "data": {"split": {"validation_characters": 5}},
            "train": {
                "n_way": 3,
                "k_shot": 1,
                "query_per_class": 2,
                "meta_batch_size": META_BATCH_SIZE,
                "iterations": ITERATIONS,
                "meta_lr": 0.02,
                "optimizer": "sgd",
                "threads": 1,
                "validate_every": 2,
                "validation_episodes": 4,
                "checkpoint_every": 2,
                "log_every": 1,
            },
            "experiments": {
                "maml": {
                    "algorithm": "maml",
                    "model": {"hidden": 8, "downsample": "stride"},
                    "options": {"inner_lr": 0.4, "inner_steps": 1},
                },
                "proto": {"algorithm": "protonets", "model": {"hidden": 8}},
            },
        }
    )


def load_data(prefetched: Path) -> tuple[OmniglotArrays, Split]:
    arrays = load_prefetched(prefetched)
    return arrays, make_split(arrays.character_origin, experiment_params().data.split)


class Interrupt(Exception):
    """Stands in for a kill in the middle of training."""


def train_experiment(
    name: str,
    arrays: OmniglotArrays,
    split: Split,
    checkpoint_dir: Path,
    distributed: DistributedContext,
    interrupt_at: int | None = None,
) -> dict[str, Any]:
    """Train experiment ``name``; with ``interrupt_at``, stop before that iteration (every
    process at once, as a kill of the job would) and resume with a fresh Trainer."""
    logged_steps: list[int] = []

    def trainer() -> Trainer:
        return Trainer(
            name,
            experiment_params(),
            arrays,
            split,
            checkpoint_dir,
            progress=False,
            on_log=lambda metrics, step: logged_steps.append(step),
            distributed=distributed,
        )

    if interrupt_at is not None:
        first = trainer()
        real_step = first.step

        def step() -> dict[str, float]:
            if first.iteration == interrupt_at:
                raise Interrupt
            return real_step()

        first.step = step
        try:
            first.run()
        except Interrupt:
            pass
    finished = trainer()
    finished.run()
    return {
        "state": {key: value.clone() for key, value in finished.learner.state_dict().items()},
        "losses": [row["loss"] for row in finished.history],
        "best_accuracy": finished.best_accuracy,
        "logged_steps": logged_steps,
        "checkpoint_written": finished.checkpoint.path.exists(),
    }


def reduction_check(context: DistributedContext) -> dict[str, Any]:
    """All-reduce hand-made gradients and statistics of a 5-task meta-batch (slices of 3
    and 2 tasks); rank r's values are chosen so that the weighted sums are easy to state."""
    weight = context.task_weight(5)
    both = nn.Parameter(torch.zeros(3))
    both.grad = torch.tensor([1.0, 2.0, 3.0]) * (10 if context.rank == 1 else 1)
    only_rank_1 = nn.Parameter(torch.zeros(2))
    only_rank_1.grad = torch.full((2,), 5.0) if context.rank == 1 else None
    nowhere = nn.Parameter(torch.zeros(2))
    in_float64 = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    in_float64.grad = torch.tensor([1.0 + context.rank], dtype=torch.float64)
    all_reduce_gradients([both, only_rank_1, nowhere, in_float64], weight)
    stats = StepStats(
        loss=1.0 + context.rank, accuracy=0.5 + 0.5 * context.rank, extra={"x": 2.0 + context.rank}
    )
    reduced = all_reduce_stats(stats, weight)
    return {
        "weight": weight,
        "both": both.grad,
        "only_rank_1": only_rank_1.grad,
        "nowhere": nowhere.grad,
        "in_float64": in_float64.grad,
        "stats": (reduced.loss, reduced.accuracy, reduced.extra),
    }


def main() -> None:
    output, prefetched = Path(sys.argv[1]), Path(sys.argv[2])
    context = init_distributed(timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results: dict[str, Any] = {"context": context, "reduction": reduction_check(context)}
    arrays, split = load_data(prefetched)
    # Separate checkpoint directories per rank: only rank 0 may write, and rank 1 must
    # resume from what rank 0 read (as on a machine without rank 0's filesystem).
    checkpoints = output / f"checkpoints_rank{context.rank}"
    for name in EXPERIMENTS:
        results[name] = train_experiment(name, arrays, split, checkpoints / "straight", context)
    results["proto_resumed"] = train_experiment(
        "proto", arrays, split, checkpoints / "resumed", context, interrupt_at=3
    )
    torch.save(results, output / f"rank{context.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
