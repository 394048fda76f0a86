"""Prototypical Networks (Snell et al. 2017): nearest class mean in a learned embedding."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from metalab.algorithms.base import BuildContext
from metalab.algorithms.embedding import (
    FeatureExtractor,
    OnePassLearner,
    QueryClassifier,
    TaskDropoutRates,
    class_means,
    squared_euclidean_logits,
)


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: protonets``."""

    model_config = ConfigDict(extra="forbid")

    train_n_way: int | None = Field(
        None,
        ge=2,
        le=1000,
        description="ways per meta-training episode (the paper uses 60); None = the test n_way",
    )
    task_dropout_rates: TaskDropoutRates = None


class PrototypicalNetwork(OnePassLearner):
    """Logits of a query = minus squared Euclidean distance to each class prototype.

    The prototype of a class is the mean embedding of its support examples, so the same
    network serves any way count; ``train_n_way`` is the way count the train loop should
    sample meta-training episodes with (the paper trains 60-way to test 5- or 20-way).
    """

    algorithm = "protonets"

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.embedding = FeatureExtractor(context, options.task_dropout_rates)
        self.train_n_way = options.train_n_way or context.n_way

    def task_classifier(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        meta_training: bool,
    ) -> QueryClassifier:
        """Prototypes [N, D] of support features [S, D]; queries [Q, D] -> logits [Q, N]."""
        prototypes = class_means(support_features, support_y, n_way)
        return lambda query_features: squared_euclidean_logits(query_features, prototypes)


def build(options: Options, context: BuildContext) -> PrototypicalNetwork:
    return PrototypicalNetwork(options, context)
