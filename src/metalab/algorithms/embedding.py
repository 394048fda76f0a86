"""What the metric and embedding-based learners share (ProtoNets, generated_head,
film_prototypes, Meta Networks, LEO).

- support-set helpers: `check_support_labels`, `class_counts`, `class_means`,
  `squared_euclidean_logits`;
- `FeatureExtractor`: the body of a `build_model` network as an embedding, with per-task
  task dropout masks and the run's precision (`metalab.algorithms.precision`);
- `backward_mean_over_tasks`: the per-task meta-training loop, one task's graph at a time;
- `EmbeddingLearner`: a learner around a `FeatureExtractor`, and `OnePassLearner`: one that
  classifies a task's queries from its support set in one forward pass (no gradient
  descent), meta-trained on the mean query cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from metalab.algorithms.base import (
    BuildContext,
    MetaLearner,
    Predictor,
    StepStats,
    TaskBatchPredictor,
    TrainProgress,
    check_query_tasks,
)
from metalab.algorithms.precision import autocast
from metalab.algorithms.task_forward import body_features
from metalab.data.episodes import Episodes
from metalab.models import build_model, draw_dropout_masks

DropoutRate = Annotated[float, Field(ge=0.0, lt=1.0)]
#: The ``task_dropout_rates`` option of the learners that support task dropout.
TaskDropoutRates = Annotated[
    list[DropoutRate] | None,
    Field(
        min_length=1,
        description="task dropout (the seed project's 'Meta Dropout'): rate per Conv4 block "
        "(seed: [0.05, 0.10, 0.15, 0.05]); one mask per task, meta-training only; None = off",
    ),
]
#: One task dropout mask per Conv4 block, each [1, C, H, W] (None: no dropout there).
DropoutMasks = list[torch.Tensor | None]
#: A task's classifier: query features [Q, D] -> logits [Q, N].
QueryClassifier = Callable[[torch.Tensor], torch.Tensor]
#: Tasks per pass of `FeatureExtractor.embed_tasks` on the CPU. One was the fastest on this
#: project's CPU (ProtoNets evaluation, CPU time per episode: 2 tasks per pass 1-4% slower,
#: 4 tasks 5-15%): a convolution costs the same per image whatever the batch, and the first
#: block's folded BatchNorm is a product with block-diagonal weights whose cost grows with
#: the square of the tasks per pass. Other devices embed all tasks of a call in one pass
#: (there, small kernels cost their launch more than their arithmetic).
CPU_TASKS_PER_PASS = 1


def check_support_labels(support_y: torch.Tensor) -> int:
    """Return the way count N of a support set whose labels must be exactly 0..N-1.

    support_y: int64 [S]. Raises ValueError when a class in 0..max has no example, since
    its class mean (or generated weights) would be undefined.
    """
    if support_y.dim() != 1 or support_y.numel() == 0:
        raise ValueError(
            f"support_y must be a non-empty 1-D label vector, got {tuple(support_y.shape)}"
        )
    if int(support_y.min()) < 0:
        raise ValueError("support labels must be 0..N-1, found a negative label")
    n_way = int(support_y.max()) + 1
    counts = class_counts(support_y, n_way)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"support labels must cover 0..{n_way - 1}; classes {missing} have no example"
        )
    return n_way


def class_counts(labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Examples per class: labels int64 [S] in 0..n_way-1 -> int64 [n_way].

    A one-hot sum rather than ``bincount``: the same counts, from an op with a kernel on
    every device (the meta device has none for ``bincount``)."""
    return F.one_hot(labels, n_way).sum(dim=0)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding of each class: embeddings [S, D], labels int64 [S] -> [n_way, D]."""
    return torch.stack([embeddings[labels == c].mean(dim=0) for c in range(n_way)])


def squared_euclidean_logits(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Minus squared Euclidean distances: query [Q, D], prototypes [N, D] -> logits [Q, N].

    Computed as an explicit difference rather than ||q||^2 - 2qp + ||p||^2, which loses
    precision when a query sits next to a prototype.
    """
    return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=-1)


def check_task_dropout_rates(network: nn.Module, rates: list[float] | None) -> None:
    """Raise ValueError unless ``rates`` (if given) has one entry per Conv4 block."""
    if rates is None:
        return
    shapes = getattr(network, "block_output_shapes", None)
    if shapes is None:
        raise ValueError(
            f"task dropout needs Conv4 (per-block masks); got {type(network).__name__}"
        )
    if len(rates) != len(shapes):
        raise ValueError(
            f"task_dropout_rates needs one rate per Conv4 block ({len(shapes)}), got {len(rates)}"
        )


class FeatureExtractor(nn.Module):
    """The body of a `build_model` network as an embedding: features [B, feature_dim].

    Runs under the autocast of the run's precision and returns the parameters' dtype
    (float32) so that distances and losses stay in full precision. Task dropout:
    `draw_task_masks` draws one mask per block for a task; pass the same masks to every
    pass of that task.
    """

    def __init__(
        self,
        context: BuildContext,
        task_dropout_rates: list[float] | None = None,
    ) -> None:
        super().__init__()
        network = build_model(context.model, context.n_way, context.image_size)
        # Only the body is used; dropping the linear head keeps unused parameters out of the
        # optimizer and the checkpoints.
        network.head = nn.Identity()
        check_task_dropout_rates(network, task_dropout_rates)
        self.network = network
        self.feature_dim: int = int(network.feature_dim)
        self.task_dropout_rates = list(task_dropout_rates) if task_dropout_rates else None
        self.precision = context.precision

    def draw_task_masks(self) -> DropoutMasks | None:
        """Fresh task dropout masks for one task, or None when off: drawn from torch's
        global CPU RNG (the same masks on every device), on the parameters' device."""
        if self.task_dropout_rates is None:
            return None
        reference = next(self.network.parameters())
        return draw_dropout_masks(
            self.network.block_output_shapes,
            self.task_dropout_rates,
            dtype=reference.dtype,
            device=reference.device,
        )

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The autocast context of this run's precision on ``device_type`` (a no-op for
        fp32)."""
        return autocast(self.precision, device_type)

    def embed_tasks(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time features of T tasks' images, without task dropout, BatchNorm statistics
        per task: images float [T, B, 1, H, W] -> [T, B, feature_dim], task t equal to
        ``forward(images[t])`` up to float rounding.

        A Conv4 runs through the MAML family's vectorised forward (grouped convolutions,
        channels-last, the first BatchNorm folded into its convolution:
        `metalab.algorithms.task_forward.body_features`), `CPU_TASKS_PER_PASS` tasks per
        pass on the CPU and all at once elsewhere; other networks task by task. Activation
        memory is one pass's.
        """
        per_pass = CPU_TASKS_PER_PASS if images.device.type == "cpu" else images.shape[0]
        return torch.cat(
            [
                body_features(self.network, tasks, None, self.precision, True, True)
                for tasks in images.split(per_pass)
            ]
        )

    def forward(self, images: torch.Tensor, masks: DropoutMasks | None = None) -> torch.Tensor:
        """images float [B, 1, H, W] -> features [B, feature_dim] in the parameters' dtype."""
        dtype = next(self.network.parameters()).dtype
        with self.autocast(images.device.type):
            if masks is None:
                features = self.network.features(images)
            else:
                features = self.network.features(images, masks)
        return features.to(dtype)


class TaskOutcome(NamedTuple):
    """One task's meta-training outcome."""

    #: Scalar whose gradient is the task's meta-gradient.
    objective: torch.Tensor
    #: The task's query logits [Q, N] (for the accuracy).
    query_logits: torch.Tensor
    #: Scalars to average over the tasks: "query_loss" becomes `StepStats.loss`, the others
    #: `StepStats.extra` (in this order).
    logged: dict[str, torch.Tensor]


def backward_mean_over_tasks(
    episodes: Episodes, task_outcome: Callable[[int], TaskOutcome]
) -> StepStats:
    """Accumulate the gradient of the mean objective over the tasks of ``episodes``.

    ``task_outcome(task)`` computes task ``task``'s `TaskOutcome`; tasks run in order.
    Returns the means of the logged values and the mean query accuracy (``extra`` None
    when only "query_loss" is logged).
    """
    num_tasks = episodes.num_tasks
    sums: dict[str, float] = {}
    total_accuracy = 0.0
    for task in range(num_tasks):
        objective, query_logits, logged = task_outcome(task)
        # One backward per task keeps only one task's graph alive; the sum of
        # objective / T over tasks is the gradient of the mean.
        (objective / num_tasks).backward()
        for name, value in logged.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        query_y = episodes.query_y[task]
        total_accuracy += (query_logits.argmax(dim=1) == query_y).float().mean().item()
    means = {name: value / num_tasks for name, value in sums.items()}
    loss = means.pop("query_loss")
    return StepStats(loss=loss, accuracy=total_accuracy / num_tasks, extra=means or None)


class EmbeddingLearner(MetaLearner):
    """A learner built around a `FeatureExtractor` ``self.embedding``."""

    embedding: FeatureExtractor

    @property
    def model(self) -> nn.Module:
        """The `build_model` network (head removed) whose body a pretrained body loads into."""
        return self.embedding.network


class OnePassLearner(EmbeddingLearner):
    """An `EmbeddingLearner` that turns a task's support features into a classifier of its
    query features in one forward pass (`task_classifier`).

    Meta-training is the mean query cross-entropy, with one set of task dropout masks per
    task shared by its support and query passes; `adapt` is the same pass without dropout
    or gradients, and `adapt_many` that of many tasks with their images embedded together
    (`FeatureExtractor.embed_tasks`). Support and query go through the network in separate
    passes, as at test time, so (batch-statistics) BatchNorm sees the same kind of batch in
    both.
    """

    batches_tasks = True

    def task_classifier(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        meta_training: bool,
    ) -> QueryClassifier:
        """The task's classifier from support features [S, D] and labels [S] in 0..n_way-1
        (checked). ``meta_training``: whether the result is to be meta-differentiated."""
        raise NotImplementedError

    def step_extra(self) -> dict[str, float] | None:
        """Extra values to log with each meta-iteration."""
        return None

    def task_logits(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        masks: DropoutMasks | None = None,
    ) -> torch.Tensor:
        """support_x [S, 1, H, W], support_y [S], query_x [Q, 1, H, W] -> logits [Q, N],
        differentiable in the meta-parameters."""
        n_way = check_support_labels(support_y)
        classify = self.task_classifier(
            self.embedding(support_x, masks), support_y, n_way, meta_training=True
        )
        return classify(self.embedding(query_x, masks))

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        def task_outcome(task: int) -> TaskOutcome:
            masks = self.embedding.draw_task_masks()
            logits = self.task_logits(
                episodes.support_x[task], episodes.support_y[task], episodes.query_x[task], masks
            )
            loss = F.cross_entropy(logits, episodes.query_y[task])
            return TaskOutcome(loss, logits, {"query_loss": loss})

        stats = backward_mean_over_tasks(episodes, task_outcome)
        return replace(stats, extra=self.step_extra())

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """One forward pass over the support set; ``steps`` is ignored (no gradient steps)."""
        n_way = check_support_labels(support_y)
        with torch.no_grad():
            classify = self.task_classifier(
                self.embedding(support_x), support_y, n_way, meta_training=False
            )

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return classify(self.embedding(query_x))

        return predict

    def adapt_many(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """`adapt` for T tasks: support_x [T, S, 1, H, W], support_y [T, S]; the images of all
        tasks are embedded together (`FeatureExtractor.embed_tasks`), each task's classifier
        built from its own. Returns predictor(query_x [T, Q, 1, H, W]) -> logits [T, Q, N]."""
        n_ways = [check_support_labels(labels) for labels in support_y]
        with torch.no_grad():
            features = self.embedding.embed_tasks(support_x)
            classifiers = [
                self.task_classifier(task_features, labels, n_way, meta_training=False)
                for task_features, labels, n_way in zip(features, support_y, n_ways, strict=True)
            ]

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            check_query_tasks(query_x, len(classifiers))
            with torch.no_grad():
                features = self.embedding.embed_tasks(query_x)
                return torch.stack(
                    [classify(x) for classify, x in zip(classifiers, features, strict=True)]
                )

        return predict
