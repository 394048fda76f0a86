"""Running a meta-batch of tasks in chunks, sequentially or on several threads.

A MAML-style learner computes each task's meta-loss with a function of a slice of the
meta-batch (``run_chunk(tasks) -> TaskOutcome``). When the meta-loss is the mean over the
tasks, its gradient is the sum of the chunks' gradients / T, so each chunk is
backpropagated as soon as it is done and its graph freed; otherwise every chunk's graph is
kept for one backward pass of the combined loss (the caller's).

With several torch threads on the CPU, whole chunks run on worker threads with
single-threaded kernels instead of all threads splitting every (small) kernel:
`run_chunks_in_threads`. Gradients are summed in a fixed order, so reruns are
bit-identical. On any other device (a GPU) chunks run one after another in the calling
thread: its kernels are asynchronous, and torch's CPU thread count says nothing about it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalab.algorithms.functional import per_task_accuracy


@dataclass
class TaskOutcome:
    """What running the inner loop on a batch of T tasks produced.

    meta_losses [T]: each task's (possibly step-weighted) query loss, in the graph.
    final_query_logits [T, Q, N] and final_query_losses [T]: after the last inner step.
    pre_adaptation_logits [T, Q, N] or None: of the un-adapted model on the query set, in
    the graph (only when the learner asks for them).
    """

    meta_losses: Tensor
    final_query_logits: Tensor
    final_query_losses: Tensor
    pre_adaptation_logits: Tensor | None


@dataclass
class MetaBatchOutcome:
    """The outcomes of a meta-batch's T tasks, concatenated over its chunks.

    meta_losses [T] (in the graph unless backpropagated chunk by chunk);
    final_query_losses [T] and accuracies [T] after the last inner step (detached);
    pre_adaptation_logits: per task [Q, N] in the graph, when the chunks produced them.
    """

    meta_losses: Tensor
    final_query_losses: Tensor
    accuracies: Tensor
    pre_adaptation_logits: list[Tensor]


@dataclass(frozen=True)
class TaskRunner:
    """How a learner splits a meta-batch: ``chunk_size`` tasks per pass, and whether chunks
    may run on several threads (``task_parallel``)."""

    chunk_size: int
    task_parallel: bool

    def chunks(self, num_tasks: int) -> list[slice]:
        """Consecutive slices of at most ``chunk_size`` tasks covering 0..num_tasks-1."""
        size = self.chunk_size
        return [slice(s, min(s + size, num_tasks)) for s in range(0, num_tasks, size)]

    def workers(self, num_chunks: int, device: torch.device | str = "cpu") -> int:
        """How many threads share ``num_chunks`` chunks computed on ``device``: torch's
        intra-op thread count when ``task_parallel`` on the CPU, at most one per chunk;
        one (the calling thread) on any other device."""
        if not self.task_parallel or torch.device(device).type != "cpu":
            return 1
        return max(1, min(torch.get_num_threads(), num_chunks))

    def run(
        self,
        run_chunk: Callable[[slice], TaskOutcome],
        query_y: Tensor,
        inputs: list[nn.Parameter],
        backward_per_chunk: bool,
    ) -> MetaBatchOutcome:
        """Run all T tasks (query_y int64 [T, Q]) chunk by chunk.

        With ``backward_per_chunk`` (the meta-loss is the mean over the T tasks), the
        gradient of each chunk's ``meta_losses.sum() / T`` with respect to ``inputs`` is
        added to their ``.grad`` and the chunk's graph freed; otherwise nothing is
        backpropagated and the meta-losses and pre-adaptation logits keep their graphs.
        """
        num_tasks = query_y.shape[0]
        chunks = self.chunks(num_tasks)
        workers = self.workers(len(chunks), query_y.device) if backward_per_chunk else 1
        if workers > 1:
            outcomes = run_chunks_in_threads(run_chunk, chunks, workers, inputs, num_tasks)
        else:
            outcomes = []
            for tasks in chunks:
                outcome = run_chunk(tasks)
                if backward_per_chunk:
                    if inputs:
                        (outcome.meta_losses.sum() / num_tasks).backward(inputs=inputs)
                    outcome = detached(outcome)
                outcomes.append(outcome)
        return MetaBatchOutcome(
            meta_losses=torch.cat([o.meta_losses for o in outcomes]),
            final_query_losses=torch.cat([o.final_query_losses.detach() for o in outcomes]),
            accuracies=torch.cat(
                [
                    per_task_accuracy(o.final_query_logits.detach(), query_y[tasks])
                    for o, tasks in zip(outcomes, chunks, strict=True)
                ]
            ),
            pre_adaptation_logits=[
                logits
                for o in outcomes
                if o.pre_adaptation_logits is not None
                for logits in o.pre_adaptation_logits.unbind(0)
            ],
        )


def run_chunks_in_threads(
    run_chunk: Callable[[slice], TaskOutcome],
    chunks: list[slice],
    workers: int,
    inputs: list[nn.Parameter],
    num_tasks: int,
) -> list[TaskOutcome]:
    """Task parallelism: each of ``workers`` threads runs a contiguous share of the chunks
    with single-threaded kernels and sums its chunks' meta-gradients in order.

    Per-task tensors are small, so two threads each running whole chunks beat two threads
    splitting every kernel (measured in benchmarks/throughput.py). Gradients are returned
    by `torch.autograd.grad` and added to ``.grad`` here in a fixed order, never
    accumulated concurrently, so a rerun gives bit-identical results. Returns the detached
    outcomes in chunk order.
    """
    shares = [
        chunks[w * len(chunks) // workers : (w + 1) * len(chunks) // workers]
        for w in range(workers)
    ]

    def run_share(share: list[slice]) -> tuple[list[TaskOutcome], list[Tensor | None]]:
        outcomes: list[TaskOutcome] = []
        total: list[Tensor | None] = [None] * len(inputs)
        for tasks in share:
            outcome = run_chunk(tasks)
            if inputs:
                grads = torch.autograd.grad(
                    outcome.meta_losses.sum() / num_tasks, inputs, allow_unused=True
                )
                total = [add(a, b) for a, b in zip(total, grads, strict=True)]
            outcomes.append(detached(outcome))
        return outcomes, total

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # worker threads start with (and keep) one intra-op thread
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="metalab-tasks") as pool:
            results = list(pool.map(run_share, shares))
    finally:
        torch.set_num_threads(threads)
    outcomes = [outcome for share_outcomes, _ in results for outcome in share_outcomes]
    for index, parameter in enumerate(inputs):
        grad = None
        for _, totals in results:
            grad = add(grad, totals[index])
        if grad is not None:
            parameter.grad = grad if parameter.grad is None else parameter.grad + grad
    return outcomes


def add(total: Tensor | None, value: Tensor | None) -> Tensor | None:
    """total + value, where None stands for zero."""
    if value is None:
        return total
    return value if total is None else total + value


def detached(outcome: TaskOutcome) -> TaskOutcome:
    """The outcome's tensors without their autograd graphs (frees the chunk's graph)."""
    return TaskOutcome(
        outcome.meta_losses.detach(),
        outcome.final_query_logits.detach(),
        outcome.final_query_losses.detach(),
        None,
    )
