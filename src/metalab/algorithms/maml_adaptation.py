"""Test-time adaptation of the MAML family (`metalab.algorithms.maml.MAMLLearner`).

Evaluation scores a gradient learner before adaptation (``steps=0``) and after it. Both
come from one inner loop here: theta_0 and theta_K of each task are kept, and one query
forward object serves both. For ANIL (``adapt_parameters: head``) that forward caches the
body features, so the query images go through the body once instead of twice; for MAML
proper the two query passes run at different weights and only the setup is shared.

This module is the MAML core's own: it drives `MAMLLearner`'s inner-loop hooks
(``_task_forward``, ``_adapt_on_support``, ...), which is why it reads private members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from metalab.algorithms.base import BeforeAfterPredictor, TaskBatchPredictor, check_query_tasks
from metalab.algorithms.functional import (
    ParameterDict,
    adaptation_lr,
    adaptation_start,
    stack_for_tasks,
)
from metalab.algorithms.learned_noise import support_noise, task_seeds
from metalab.algorithms.task_forward import HeadOnlyForward, TaskForward


class MAMLLearner(Protocol):
    """What this module reads of `metalab.algorithms.maml.MAMLLearner` (declared here, so
    that the two modules do not import each other)."""

    model: nn.Module
    n_way: int
    options: Any
    task_runner: Any
    adapted_names: Any
    _adapt_on_support: Callable[..., Any]
    _initial_params: Callable[..., Any]
    _inner_lr: Callable[..., Any]
    _task_forward: Callable[..., Any]
    noise_generator: Any


# Which ends of a task's inner-loop trajectory a predictor reads: theta_0, theta_K.
BEFORE, AFTER = 0, 1


def test_time_forward(
    learner: MAMLLearner, support_x: Tensor | None, query_x: Tensor | None
) -> TaskForward:
    """The learner's forward for a chunk of tasks (x [T, B, 1, H, W]) without task dropout;
    ANIL's body weights channels-last when its inputs are (see `body_features`)."""
    forward = learner._task_forward(support_x, query_x, None)
    if isinstance(forward, HeadOnlyForward):
        forward.channels_last_weights = True
    return forward


def adapt_chunks(
    learner: MAMLLearner, support_x: Tensor, support_y: Tensor, steps: int
) -> tuple[list[slice], list[tuple[ParameterDict, ParameterDict]]]:
    """``steps`` first-order inner steps on T tasks' support sets (support_x [T, S, 1, H, W],
    support_y [T, S] in 0..N-1, one N), without task dropout, in the learner's
    `task_runner` chunks (memory: one chunk's activations).

    For N other than the trained way count the head starts as a fresh zero N-way head,
    adapted with the rest (Meta-SGD: class-averaged head lrs). ANIL computes the support
    features without an autograd graph (the body stays fixed). With ``learned_noise``
    every support loss is the mean over ``learned_noise_test_samples`` noise draws (one
    seed per task from the global torch RNG, in task order, drawn only when steps > 0).
    Returns the chunks and, per chunk, (theta_0, theta_steps) detached (stacked
    [T_chunk, ...] on the vectorised path)."""
    dtype = learner.model.head.weight.dtype
    n_way = int(support_y.max().item()) + 1
    start = adaptation_start(
        learner._initial_params(None), learner.adapted_names, n_way, learner.n_way
    )
    inner_lr = adaptation_lr(learner._inner_lr, n_way, learner.n_way)
    chunks = learner.task_runner.chunks(support_x.shape[0])
    # Zero steps draw nothing (the per-episode evaluation's un-adapted pass).
    seeds = task_seeds(learner.noise_generator, support_x.shape[0]) if steps > 0 else None
    samples = learner.options.learned_noise_test_samples
    ends = []
    for tasks in chunks:
        chunk_x = support_x[tasks].to(dtype)
        forward = test_time_forward(learner, chunk_x, None)
        params = stack_for_tasks(start, chunk_x.shape[0]) if forward.stacked else start
        chunk_seeds = None if seeds is None else seeds[tasks]
        noise = support_noise(learner.noise_generator, chunk_seeds, samples)
        if steps > 0 and noise is None:
            with torch.no_grad():
                forward.precompute("support")
        with torch.enable_grad():
            trajectory = learner._adapt_on_support(
                forward, params, support_y[tasks], inner_lr, steps, False, noise
            )
        ends.append(tuple({n: p.detach() for n, p in trajectory[i].items()} for i in (0, -1)))
    return chunks, ends


def query_logits(
    learner: MAMLLearner,
    query_x: Tensor,
    chunks: list[slice],
    ends: list[tuple[ParameterDict, ParameterDict]],
    steps: int,
    which: tuple[int, ...],
) -> list[Tensor]:
    """Logits [T, Q, N] of query_x [T, Q, 1, H, W] at each trajectory end in ``which``
    (`BEFORE`, `AFTER`), per task, with query batch statistics; one forward object per
    chunk serves every end (ANIL: the body features are computed once)."""
    check_query_tasks(query_x, chunks[-1].stop if chunks else 0)
    dtype = learner.model.head.weight.dtype
    logits: list[list[Tensor]] = [[] for _ in which]
    with torch.no_grad():
        for tasks, params in zip(chunks, ends, strict=True):
            forward = test_time_forward(learner, None, query_x[tasks].to(dtype))
            for out, end in zip(logits, which, strict=True):
                # The step index selects MAML++'s per-step BatchNorm set.
                out.append(forward.logits(params[end], "query", steps if end == AFTER else 0))
    return [torch.cat(chunk_logits) for chunk_logits in logits]


def adapt_many(
    learner: MAMLLearner, support_x: Tensor, support_y: Tensor, steps: int | None
) -> TaskBatchPredictor:
    """`MAMLLearner.adapt_many`: ``steps`` (default ``test_inner_steps``) steps per task
    (`adapt_chunks`); predictor(query_x [T, Q, 1, H, W]) -> logits [T, Q, N]."""
    steps = learner.options.test_inner_steps if steps is None else steps
    chunks, ends = adapt_chunks(learner, support_x, support_y, steps)

    def predictor(query_x: Tensor) -> Tensor:
        return query_logits(learner, query_x, chunks, ends, steps, (AFTER,))[0]

    return predictor


def adapt_before_after(
    learner: MAMLLearner, support_x: Tensor, support_y: Tensor, steps: int | None
) -> BeforeAfterPredictor:
    """`MAMLLearner.adapt_before_after`: one inner loop (`adapt_chunks`) gives both
    theta_0 and theta_steps; predictor(query_x [T, Q, 1, H, W]) -> (logits before, logits
    after), each [T, Q, N], equal to those of ``adapt_many`` with 0 and ``steps``."""
    steps = learner.options.test_inner_steps if steps is None else steps
    chunks, ends = adapt_chunks(learner, support_x, support_y, steps)

    def predictor(query_x: Tensor) -> tuple[Tensor, Tensor]:
        before, after = query_logits(learner, query_x, chunks, ends, steps, (BEFORE, AFTER))
        return before, after

    return predictor
