"""FiLM-conditioned prototypes (``algorithm: film_prototypes``): the seed project's design
that it called "embedding-based Meta Networks". It is a prototype classifier, not a method
of Munkhdalai & Yu's Meta Networks paper (that is ``algorithm: meta_networks``,
`metalab.algorithms.meta_networks`).

A shared embedding network maps images to features; a small network reads the support
set's class means and produces a task-specific transformation of the embedding (a
feature-wise scale and shift, FiLM-style); queries are classified by similarity (cosine
with a learned temperature by default, or squared Euclidean) to the transformed class
means in one forward pass. Nothing is adapted by gradient descent at test time.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

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
    """``experiments.<name>.options`` for ``algorithm: film_prototypes``."""

    model_config = ConfigDict(extra="forbid")

    similarity: Literal["cosine", "squared_euclidean"] = Field(
        "cosine", description="how a query is compared with the task-specific class embeddings"
    )
    meta_hidden: int = Field(
        64, ge=1, le=4096, description="hidden width of the meta-learner producing scale/shift"
    )
    initial_temperature: float = Field(
        10.0, gt=0.0, le=1000.0, description="cosine logits = temperature * cosine (start value)"
    )
    learn_temperature: bool = Field(True, description="meta-learn the cosine temperature")
    task_dropout_rates: TaskDropoutRates = None


def task_summary(prototypes: torch.Tensor) -> torch.Tensor:
    """What the meta-learner sees of a task: prototypes [N, D] -> [2D].

    The mean over classes says where the task lives in feature space, the spread over
    classes says which features tell its classes apart. Both are symmetric in the classes,
    so any way count and any label order give a valid summary.
    """
    # sqrt(var + eps) rather than std: std's gradient is NaN where all classes agree on a
    # feature (e.g. a ReLU unit that is zero for the whole task).
    spread = (prototypes.var(dim=0, unbiased=False) + 1e-6).sqrt()
    return torch.cat([prototypes.mean(dim=0), spread])


class FilmPrototypesLearner(OnePassLearner):
    """Task-conditioned embedding g(x) = f(x) * (1 + scale) + shift, then similarity.

    f is the shared Conv4 body (D features); (scale, shift) in R^D each come from the
    meta-learner applied to `task_summary` of the support prototypes. The meta-learner's
    last layer starts at zero, so training starts from plain prototype classification.
    """

    algorithm = "film_prototypes"

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.embedding = FeatureExtractor(context, options.task_dropout_rates)
        feature_dim = self.embedding.feature_dim
        self.meta_learner = nn.Sequential(
            nn.Linear(2 * feature_dim, options.meta_hidden),
            nn.ReLU(),
            nn.Linear(options.meta_hidden, 2 * feature_dim),
        )
        nn.init.zeros_(self.meta_learner[-1].weight)
        nn.init.zeros_(self.meta_learner[-1].bias)
        self.similarity = options.similarity
        log_temperature = torch.tensor(math.log(options.initial_temperature))
        if options.learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)

    def task_transform(
        self, support_features: torch.Tensor, support_y: torch.Tensor, n_way: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """support_features [S, D] -> (scale [D], shift [D], class embeddings [N, D])."""
        prototypes = class_means(support_features, support_y, n_way)
        scale, shift = self.meta_learner(task_summary(prototypes)).chunk(2)
        class_embeddings = prototypes * (1.0 + scale) + shift
        return scale, shift, class_embeddings

    def similarity_logits(
        self, query: torch.Tensor, class_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """query [Q, D], class_embeddings [N, D] -> logits [Q, N]."""
        if self.similarity == "cosine":
            cosine = F.normalize(query, dim=-1) @ F.normalize(class_embeddings, dim=-1).T
            return self.log_temperature.exp() * cosine
        return squared_euclidean_logits(query, class_embeddings)

    def task_classifier(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        meta_training: bool,
    ) -> QueryClassifier:
        """Task transform from support features [S, D]; queries [Q, D] -> logits [Q, N]."""
        scale, shift, class_embeddings = self.task_transform(support_features, support_y, n_way)
        return lambda query_features: self.similarity_logits(
            query_features * (1.0 + scale) + shift, class_embeddings
        )

    def step_extra(self) -> dict[str, float]:
        return {"temperature": self.log_temperature.detach().exp().item()}


def build(options: Options, context: BuildContext) -> FilmPrototypesLearner:
    return FilmPrototypesLearner(options, context)
