"""Meta-batches split across processes (torchrun): slices, weighted all-reduce, and two
gloo processes on the CPU ending with the same weights as one process on the same tasks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_worker import EXPERIMENTS, load_data, train_experiment
from synthetic import build_context
from torch import Tensor

from metalab.algorithms.maml import MAMLLearner, Options
from metalab.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    NotSplittableError,
    all_reduce_gradients,
    check_splittable,
    environment_context,
    slice_random_stream,
    task_slice,
    threads_per_process,
)
from metalab.models import Conv4

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZE = 2


# ---------------------------------------------------------------------- in one process
def test_task_slices_are_contiguous_near_equal_and_cover_the_batch():
    assert [task_slice(7, rank, 3) for rank in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert [task_slice(3, rank, 2) for rank in range(2)] == [slice(0, 2), slice(2, 3)]
    assert [task_slice(2, rank, 2) for rank in range(2)] == [slice(0, 1), slice(1, 2)]
    assert task_slice(32, 0, 1) == slice(0, 32)
    weights = [DistributedContext(rank, 3).task_weight(7) for rank in range(3)]
    assert weights == [3 / 7, 2 / 7, 2 / 7]


def test_fewer_tasks_than_processes_is_refused_clearly():
    with pytest.raises(NotSplittableError, match="3 tasks cannot be split across 4 processes"):
        task_slice(3, 0, 4)
    with pytest.raises(NotSplittableError, match="meta_batch_size"):
        check_splittable(torch.nn.Linear(1, 1), 1, DistributedContext(0, 2))


class MaxTaskLossMAML(MAMLLearner):
    """A learner whose meta-loss is not a mean over tasks (like TAML's)."""

    def combine_task_losses(self, query_losses: Tensor, pre_adaptation_logits: list) -> Tensor:
        return query_losses.max()


def test_a_learner_that_does_not_average_its_tasks_is_refused_across_processes():
    context = build_context(n_way=3)
    learner = MaxTaskLossMAML(Conv4(3, context.image_size, hidden=4), 3, Options())
    with pytest.raises(NotSplittableError, match="MaxTaskLossMAML combines its tasks' losses"):
        check_splittable(learner, 8, DistributedContext(1, 2))
    check_splittable(learner, 8, SINGLE_PROCESS)  # a single process computes it whole
    plain = MAMLLearner(Conv4(3, context.image_size, hidden=4), 3, Options())
    check_splittable(plain, 8, DistributedContext(1, 2))


def test_context_comes_from_torchrun_environment():
    assert environment_context({}) == SINGLE_PROCESS
    assert environment_context({"WORLD_SIZE": "1", "RANK": "0"}) == SINGLE_PROCESS
    environ = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    context = environment_context(environ)
    assert context == DistributedContext(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert context.enabled and not context.is_main
    assert threads_per_process(4, context) == 2
    assert threads_per_process(1, context) == 1
    assert threads_per_process(2, SINGLE_PROCESS) == 2


def test_single_process_all_reduce_only_applies_the_weight():
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.tensor([1.0, -2.0])
    untouched = torch.nn.Parameter(torch.zeros(1))
    all_reduce_gradients([parameter, untouched], 1.0)
    assert torch.equal(parameter.grad, torch.tensor([1.0, -2.0])) and untouched.grad is None
    all_reduce_gradients([parameter], 0.25)
    assert torch.equal(parameter.grad, torch.tensor([0.25, -0.5]))


def test_slices_draw_from_distinct_reproducible_streams_and_leave_the_global_rng_alone():
    torch.manual_seed(7)
    outer = torch.get_rng_state()

    def draw(rank: int, iteration: int) -> Tensor:
        with slice_random_stream(0, iteration, DistributedContext(rank, 2)) as use:
            values = torch.rand(4)
        assert use.consumed
        return values

    first, second = draw(0, 5), draw(1, 5)
    assert not torch.equal(first, second)  # ranks do not repeat each other's masks
    assert torch.equal(first, draw(0, 5))  # same (seed, iteration, rank): same draws
    assert not torch.equal(first, draw(0, 6))
    assert torch.equal(torch.get_rng_state(), outer)
    with slice_random_stream(0, 5, SINGLE_PROCESS) as use:  # one process: untouched
        assert torch.equal(torch.get_rng_state(), outer)
    assert not use.consumed


# ------------------------------------------------------------------- two gloo processes
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tiny_prefetched_28: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    """Run tests/distributed_worker.py as ranks 0 and 1 of a gloo group on 127.0.0.1 and
    return what each rank saved."""
    output = tmp_path_factory.mktemp("distributed")
    port = free_port()
    processes = []
    with contextlib.ExitStack() as logs:
        for rank in range(WORLD_SIZE):
            environ = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORLD_SIZE),
                "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            # A file, not a pipe: a full pipe would block one rank and so both.
            log = logs.enter_context(open(output / f"rank{rank}.log", "w"))
            command = [sys.executable, str(WORKER), str(output), str(tiny_prefetched_28)]
            processes.append(subprocess.Popen(command, env=environ, stdout=log, stderr=log))
        try:
            for process in processes:
                process.wait(timeout=180)
        finally:
            for process in processes:  # only the two started here
                if process.poll() is None:
                    process.kill()
                    process.wait()
    for rank, process in enumerate(processes):
        text = (output / f"rank{rank}.log").read_text()
        assert process.returncode == 0, f"rank {rank} failed:\n{text}"
    return [torch.load(output / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def one_process(tiny_prefetched_28: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same experiments trained in this process alone, on the same tasks."""
    arrays, split = load_data(tiny_prefetched_28)
    checkpoints = tmp_path_factory.mktemp("single_process")
    previous = torch.get_num_threads()
    try:
        return {
            name: train_experiment(name, arrays, split, checkpoints, SINGLE_PROCESS)
            for name in EXPERIMENTS
        }
    finally:
        torch.set_num_threads(previous)


def assert_states_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def test_weighted_all_reduce_of_unequal_slices(two_processes: list[dict[str, Any]]):
    weights = [result["reduction"]["weight"] for result in two_processes]
    assert weights == [3 / 5, 2 / 5]
    for result in two_processes:
        reduction = result["reduction"]
        # 3/5 of rank 0's gradient plus 2/5 of rank 1's (ten times rank 0's).
        torch.testing.assert_close(reduction["both"], torch.tensor([4.6, 9.2, 13.8]))
        torch.testing.assert_close(reduction["only_rank_1"], torch.tensor([2.0, 2.0]))
        assert reduction["nowhere"] is None  # no gradient anywhere stays None (for Adam)
        torch.testing.assert_close(
            reduction["in_float64"], torch.tensor([1.4], dtype=torch.float64)
        )
        loss, accuracy, extra = reduction["stats"]
        assert loss == pytest.approx(1.4) and accuracy == pytest.approx(0.7)
        assert extra == {"x": pytest.approx(2.4)}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_two_processes_end_with_the_single_process_weights(
    name: str, two_processes: list[dict[str, Any]], one_process: dict[str, dict[str, Any]]
):
    single = one_process[name]
    for rank, result in enumerate(two_processes):
        ours = result[name]
        assert_states_close(ours["state"], single["state"])
        # The logged loss is the whole meta-batch's (slices of 2 and 1 tasks re-weighted).
        assert ours["losses"] == pytest.approx(single["losses"], abs=1e-5), rank
    main, other = two_processes[0][name], two_processes[1][name]
    assert main["best_accuracy"] == pytest.approx(single["best_accuracy"])
    assert main["logged_steps"] == single["logged_steps"] == [1, 2, 3, 4]
    assert other["logged_steps"] == [] and other["best_accuracy"] == -1.0  # rank 0 alone
    assert main["checkpoint_written"] and not other["checkpoint_written"]


def test_resume_across_processes_ends_with_the_uninterrupted_weights(
    two_processes: list[dict[str, Any]], one_process: dict[str, dict[str, Any]]
):
    for result in two_processes:
        # Rank 1 had no checkpoint of its own: it resumed from the state rank 0 read.
        assert_states_close(result["proto_resumed"]["state"], one_process["proto"]["state"])
