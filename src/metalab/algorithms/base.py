"""The one contract between a meta-learning algorithm and the train/evaluate machinery.

The train loop owns the optimizer, the schedule, checkpoints and logging; a learner owns
its meta-parameters and knows how to turn a meta-batch into meta-gradients, and how to
adapt to one task at test time (and, optionally, to many tasks at once: `adapt_many`).
Everything the trainer (`metalab.training`), the evaluation and the learner API
(`metalab.learner_api`) read from a learner is declared on `MetaLearner` below, with its
type and default: a new learner overrides only what differs.

An algorithm module (one per family, registered in `metalab.algorithms.registry`) defines
``Options`` (its ``experiments.<name>.options`` schema) and ``build(options, context)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from metalab.algorithms.precision import Precision
from metalab.data.episodes import Episodes
from metalab.models.config import ModelConfig


@dataclass(frozen=True)
class TrainProgress:
    """Where training is: schedules (MAML++ annealing, Reptile epsilon) read this."""

    iteration: int  # 0-based index of the meta-iteration being computed
    total_iterations: int

    @property
    def fraction(self) -> float:
        return self.iteration / max(1, self.total_iterations)


@dataclass
class StepStats:
    """What one meta-iteration reports: mean query loss and accuracy over its tasks."""

    loss: float
    accuracy: float
    extra: dict[str, float] | None = None


class Predictor(Protocol):
    def __call__(self, query_x: torch.Tensor) -> torch.Tensor:
        """query_x float [Q, 1, H, W] -> logits float [Q, n_way]."""
        ...


class TaskBatchPredictor(Protocol):
    def __call__(self, query_x: torch.Tensor) -> torch.Tensor:
        """query_x float [T, Q, 1, H, W] -> logits float [T, Q, n_way], task t's queries by
        task t's adaptation."""
        ...


class BeforeAfterPredictor(Protocol):
    def __call__(self, query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query_x float [T, Q, 1, H, W] -> (logits before adaptation, logits after it),
        each float [T, Q, n_way]."""
        ...


class MetaLearner(nn.Module):
    """Base class of every learner.

    Subclasses implement `meta_gradients` and `adapt` or `adapt_many` (each defaults to the
    other), and override the declarations below where they differ from the defaults.
    `parameter_groups` may split the meta-parameters into optimizer groups; a group may
    carry ``lr_multiplier`` (default 1) and ``warmup_iterations`` (lr 0 until then), which
    the train loop applies.
    """

    #: The algorithm's registry name (``experiments.<name>.algorithm``).
    algorithm: ClassVar[str] = "base"
    #: Whether `adapt` takes gradient steps, so that ``steps=0`` means "before adaptation"
    #: and evaluation also scores the un-adapted start.
    adapts_by_gradient: ClassVar[bool] = False
    #: The outer optimizer, or None for ``train.optimizer``.
    outer_optimizer: ClassVar[Literal["adam", "sgd"] | None] = None
    #: A fixed outer lr replacing ``train.meta_lr`` and its schedule, or None (Reptile folds
    #: its own step size into the gradients it leaves).
    outer_lr: ClassVar[float | None] = None
    #: Whether `adapt_many` adapts several tasks in one vectorised computation, so that
    #: evaluation hands it chunks of episodes. A learner that declares it overrides
    #: `adapt_many`, bounds its memory for any number of tasks, and draws no random numbers
    #: at test time (tests/test_learner_contract.py checks this). False: `adapt_many` is the
    #: loop over `adapt` below, and evaluation adapts one episode at a time. A learner whose
    #: options decide it (Reptile) makes it a property.
    batches_tasks: ClassVar[bool] = False

    #: The way count of the tasks the train loop samples for this learner, or None for
    #: ``train.n_way`` (ProtoNets trains on more ways than it is tested on).
    train_n_way: int | None = None
    #: The shots and queries per class of those tasks, or None for ``train.k_shot`` and
    #: ``train.query_per_class`` (Reptile's reference recipe trains with more shots than
    #: it is tested with); validation and meta-test tasks keep ``train``'s.
    train_k_shot: int | None = None
    train_query_per_class: int | None = None
    #: The network with a ``body`` (a submodule or property of every learner): a pretrained
    #: body (``experiments.<name>.body_init``) is loaded into ``model.body``.
    model: nn.Module

    @property
    def default_adaptation_steps(self) -> int | None:
        """Test-time adaptation steps when the caller names none (None: not applicable)."""
        return None

    @property
    def combines_tasks_by_mean(self) -> bool:
        """Whether the meta-loss is the mean of per-task losses, so the gradient of a
        meta-batch is the weighted sum of its slices' gradients (torchrun splits it)."""
        return True

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """Compute the meta-loss of a meta-batch and leave its gradient in ``.grad``.

        Gradients are accumulated into ``.grad`` (the train loop zeroes them first), and
        must be the gradient of the *mean* over the ``episodes.num_tasks`` tasks.
        """
        raise NotImplementedError

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """Adapt to one task. support_x float [S, 1, H, W], support_y int64 [S] in 0..N-1.

        ``steps`` overrides the number of test-time adaptation steps where that applies.
        Returns a predictor mapping query images to logits [Q, N]. Default: `adapt_many` on
        a batch of one task (a learner overrides `adapt`, `adapt_many` or both).
        """
        if type(self).adapt_many is MetaLearner.adapt_many:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither adapt nor adapt_many"
            )
        predict = self.adapt_many(support_x.unsqueeze(0), support_y.unsqueeze(0), steps)
        return lambda query_x: predict(query_x.unsqueeze(0))[0]

    def adapt_many(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """Adapt to T tasks of one shape at once: support_x float [T, S, 1, H, W], support_y
        int64 [T, S], each row holding every label 0..N-1 (the same N for all tasks).

        Task t's predictions are those of ``adapt(support_x[t], support_y[t], steps)`` (up to
        float rounding where a vectorised computation sums in another order). Returns a
        predictor mapping query images [T, Q, 1, H, W] to logits [T, Q, N]. Default: `adapt`
        task by task, in order.
        """
        predictors = [self.adapt(x, y, steps) for x, y in zip(support_x, support_y, strict=True)]

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            check_query_tasks(query_x, len(predictors))
            return torch.stack([p(x) for p, x in zip(predictors, query_x, strict=True)])

        return predict

    def adapt_before_after(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> BeforeAfterPredictor:
        """Before (``steps=0``) and after (``steps``) adaptation to T tasks from one call, for
        learners that adapt by gradient steps (evaluation scores both): shapes as for
        `adapt_many`. Returns predictor(query_x [T, Q, 1, H, W]) -> (the logits of
        ``adapt_many(support_x, support_y, 0)``, those of ``adapt_many(.., steps)``), each
        [T, Q, N].

        Default: `adapt_many` twice, after adaptation first, as a per-episode loop orders
        them. Override where the two share work (features of a body the inner loop does
        not change).
        """
        after = self.adapt_many(support_x, support_y, steps)
        before = self.adapt_many(support_x, support_y, 0)

        def predict(query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            after_logits = after(query_x)
            return before(query_x), after_logits

        return predict

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the meta-parameters (default: one group)."""
        return [{"name": "all", "params": [p for p in self.parameters() if p.requires_grad]}]


def check_query_tasks(query_x: torch.Tensor, num_tasks: int) -> None:
    """Raise ValueError unless query_x [T, Q, ...] holds the ``num_tasks`` adapted tasks."""
    if query_x.shape[0] != num_tasks:
        raise ValueError(f"query_x holds {query_x.shape[0]} tasks, the support sets {num_tasks}")


@dataclass(frozen=True)
class BuildContext:
    """What every algorithm's ``build(options, context)`` receives besides its options."""

    model: ModelConfig
    n_way: int
    image_size: int
    precision: Precision = "fp32"
    seed: int = 0


def scheduled_lr(group: dict[str, Any], base_lr: float, iteration: int) -> float:
    """A parameter group's lr at `iteration`: base lr x its ``lr_multiplier`` (default 1),
    and 0 before its ``warmup_iterations``."""
    if iteration < group.get("warmup_iterations", 0):
        return 0.0
    return base_lr * group.get("lr_multiplier", 1.0)
