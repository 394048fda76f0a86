"""Prototypical Networks (Snell et al. 2017): nearest class mean in a learned embedding.

Also home of the small pieces the other metric/model-based learners share (Meta Networks,
LEO): the embedding network wrapper with per-task Meta Dropout and bf16 autocast, the
support-label check and class means.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from metalab.algorithms.base import BuildContext, MetaLearner, Predictor, StepStats, TrainProgress
from metalab.data.episodes import Episodes
from metalab.models import build_model, draw_dropout_masks

DropoutRate = Annotated[float, Field(ge=0.0, lt=1.0)]
DropoutMasks = list[torch.Tensor | None]


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: protonets``."""

    model_config = ConfigDict(extra="forbid")

    train_n_way: int | None = Field(
        None,
        ge=2,
        le=1000,
        description="ways per meta-training episode (the paper uses 60); None = the test n_way",
    )
    meta_dropout_rates: list[DropoutRate] | None = Field(
        None,
        min_length=1,
        description="Meta Dropout rate per Conv4 block (seed: [0.05, 0.10, 0.15, 0.05]); "
        "one mask per task, meta-training only; None = off",
    )


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
    counts = torch.bincount(support_y, minlength=n_way)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"support labels must cover 0..{n_way - 1}; classes {missing} have no example"
        )
    return n_way


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding of each class: embeddings [S, D], labels int64 [S] -> [n_way, D]."""
    return torch.stack([embeddings[labels == c].mean(dim=0) for c in range(n_way)])


def squared_euclidean_logits(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Minus squared Euclidean distances: query [Q, D], prototypes [N, D] -> logits [Q, N].

    Computed as an explicit difference rather than ||q||^2 - 2qp + ||p||^2, which loses
    precision when a query sits next to a prototype.
    """
    return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=-1)


def check_meta_dropout_rates(network: nn.Module, rates: list[float] | None) -> None:
    """Raise ValueError unless ``rates`` (if given) has one entry per Conv4 block."""
    if rates is None:
        return
    shapes = getattr(network, "block_output_shapes", None)
    if shapes is None:
        raise ValueError(
            f"Meta Dropout needs Conv4 (per-block masks); got {type(network).__name__}"
        )
    if len(rates) != len(shapes):
        raise ValueError(
            f"meta_dropout_rates needs one rate per Conv4 block ({len(shapes)}), got {len(rates)}"
        )


class FeatureExtractor(nn.Module):
    """The body of a `build_model` network as an embedding: features [B, feature_dim].

    Runs under CPU bf16 autocast when ``precision == "bf16"`` and returns the parameters'
    dtype (float32) so that distances and losses stay in full precision. Meta Dropout:
    `draw_task_masks` draws one mask per block for a task; pass the same masks to every
    pass of that task.
    """

    def __init__(
        self,
        context: BuildContext,
        meta_dropout_rates: list[float] | None = None,
    ) -> None:
        super().__init__()
        network = build_model(context.model, context.n_way, context.image_size)
        # Only the body is used; dropping the linear head keeps unused parameters out of the
        # optimizer and the checkpoints.
        network.head = nn.Identity()
        check_meta_dropout_rates(network, meta_dropout_rates)
        self.network = network
        self.feature_dim: int = int(network.feature_dim)
        self.meta_dropout_rates = list(meta_dropout_rates) if meta_dropout_rates else None
        self.precision = context.precision

    def draw_task_masks(self) -> DropoutMasks | None:
        """Fresh Meta Dropout masks for one task (global torch RNG), or None when off."""
        if self.meta_dropout_rates is None:
            return None
        dtype = next(self.network.parameters()).dtype
        return draw_dropout_masks(
            self.network.block_output_shapes, self.meta_dropout_rates, dtype=dtype
        )

    def autocast(self) -> AbstractContextManager:
        """The autocast context of this run's precision (a no-op for fp32)."""
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, images: torch.Tensor, masks: DropoutMasks | None = None) -> torch.Tensor:
        """images float [B, 1, H, W] -> features [B, feature_dim] in the parameters' dtype."""
        dtype = next(self.network.parameters()).dtype
        with self.autocast():
            if masks is None:
                features = self.network.features(images)
            else:
                features = self.network.features(images, masks)
        return features.to(dtype)


class EmbeddingLearner(MetaLearner):
    """A learner built around a `FeatureExtractor` ``self.embedding`` that classifies a
    task's queries in one pass (`task_logits`); meta-training is the mean query
    cross-entropy, with one set of Meta Dropout masks per task."""

    embedding: FeatureExtractor

    @property
    def model(self) -> nn.Module:
        """The `build_model` network (head removed) whose body a pretrained body loads into."""
        return self.embedding.network

    def task_logits(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        masks: DropoutMasks | None = None,
    ) -> torch.Tensor:
        """support_x [S, 1, H, W], support_y [S], query_x [Q, 1, H, W] -> logits [Q, N]."""
        raise NotImplementedError

    def step_extra(self) -> dict[str, float] | None:
        """Extra values to log with each meta-iteration."""
        return None

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        num_tasks = episodes.num_tasks
        total_loss = 0.0
        total_accuracy = 0.0
        for task in range(num_tasks):
            masks = self.embedding.draw_task_masks()
            logits = self.task_logits(
                episodes.support_x[task], episodes.support_y[task], episodes.query_x[task], masks
            )
            loss = F.cross_entropy(logits, episodes.query_y[task])
            # One backward per task keeps only one task's graph alive; the sum of
            # loss / T over tasks is the gradient of the mean.
            (loss / num_tasks).backward()
            total_loss += loss.item()
            total_accuracy += (logits.argmax(dim=1) == episodes.query_y[task]).float().mean().item()
        return StepStats(
            loss=total_loss / num_tasks,
            accuracy=total_accuracy / num_tasks,
            extra=self.step_extra(),
        )


class PrototypicalNetwork(EmbeddingLearner):
    """Logits of a query = minus squared Euclidean distance to each class prototype.

    The prototype of a class is the mean embedding of its support examples, so the same
    network serves any way count; ``train_n_way`` is the way count the train loop should
    sample meta-training episodes with (the paper trains 60-way to test 5- or 20-way).
    """

    algorithm = "protonets"

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.embedding = FeatureExtractor(context, options.meta_dropout_rates)
        self.train_n_way: int = options.train_n_way or context.n_way

    def task_logits(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        masks: DropoutMasks | None = None,
    ) -> torch.Tensor:
        """support_x [S, 1, H, W], support_y [S], query_x [Q, 1, H, W] -> logits [Q, N].

        Support and query go through the network in separate passes, as at test time, so
        (batch-statistics) BatchNorm sees the same kind of batch in training and testing.
        """
        n_way = check_support_labels(support_y)
        prototypes = class_means(self.embedding(support_x, masks), support_y, n_way)
        return squared_euclidean_logits(self.embedding(query_x, masks), prototypes)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """Prototypes of the support set; ``steps`` is ignored (no gradient adaptation)."""
        n_way = check_support_labels(support_y)
        with torch.no_grad():
            prototypes = class_means(self.embedding(support_x), support_y, n_way)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return squared_euclidean_logits(self.embedding(query_x), prototypes)

        return predict


def build(options: Options, context: BuildContext) -> PrototypicalNetwork:
    return PrototypicalNetwork(options, context)
