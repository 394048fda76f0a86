"""LEO, Latent Embedding Optimization (Rusu et al. 2019).

The support set is encoded into one low-dimensional Gaussian latent code per class
(encoder + relation network over all pairs of support examples); a decoder turns a code
into the weights of that class's row of a linear classifier over Conv4 features. A task is
learned by a few gradient steps on the latent codes (inner loop, in latent space), then a
few gradient steps on the decoded weights themselves (fine-tuning). Meta-training
minimises the query loss of the fine-tuned classifier plus the paper's regularisers: a KL
term pulling the codes towards N(0, I), an encoder penalty pulling the encoder's code
towards the adapted one, a soft orthogonality penalty on the decoder, and an L2 penalty.

The paper works on fixed pre-trained features; here the Conv4 body is meta-trained with the
rest (``train_body: true``) or frozen at its initialisation (``false``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from metalab.algorithms.base import (
    BeforeAfterPredictor,
    BuildContext,
    Predictor,
    StepStats,
    TaskBatchPredictor,
    TrainProgress,
    check_query_tasks,
)
from metalab.algorithms.embedding import (
    EmbeddingLearner,
    FeatureExtractor,
    TaskOutcome,
    backward_mean_over_tasks,
    check_support_labels,
    class_means,
)
from metalab.data.episodes import Episodes

# Smallest standard deviation of any Gaussian here: keeps log(std) in the KL finite.
MIN_STD = 1e-5
# std = softplus(raw - STD_OFFSET): a raw output near 0 gives std ~0.05, so sampling starts
# nearly deterministic (like the reference code's exp(raw) - 1) but stays smooth, so the
# KL term can still raise it. With softplus(raw) the initial std of 0.69 drowned the
# decoded weights in noise: 54% vs 75% 5w1s test accuracy after 150 s of training.
STD_OFFSET = 3.0


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: leo`` (defaults: the paper's)."""

    model_config = ConfigDict(extra="forbid")

    latent_dim: int = Field(64, ge=1, le=1024, description="size of each class's latent code")
    relation_hidden: int = Field(
        128, ge=1, le=4096, description="hidden width of the relation network's two layers"
    )
    inner_steps: int = Field(5, ge=0, le=100, description="gradient steps on the latent codes")
    finetune_steps: int = Field(
        5, ge=0, le=100, description="gradient steps on the decoded classifier weights"
    )
    inner_lr: float = Field(1.0, gt=0.0, le=100.0, description="latent step size (initial value)")
    finetune_lr: float = Field(
        0.001, gt=0.0, le=100.0, description="fine-tuning step size (initial value)"
    )
    learn_inner_lrs: bool = Field(True, description="meta-learn both step sizes, as the paper")
    kl_weight: float = Field(
        0.001, ge=0.0, le=100.0, description="weight of KL(q(z | support) || N(0, I))"
    )
    encoder_penalty_weight: float = Field(
        1e-9, ge=0.0, le=100.0, description="weight of ||stopgrad(adapted z) - z||^2"
    )
    orthogonality_penalty_weight: float = Field(
        0.001, ge=0.0, le=1e4, description="weight of the decoder's soft orthogonality penalty"
    )
    l2_penalty_weight: float = Field(
        1e-8, ge=0.0, le=1.0, description="L2 penalty on encoder, relation net, decoder weights"
    )
    feature_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on Conv4 features in meta-training (paper: 0.3)"
    )
    train_body: bool = Field(True, description="meta-train the Conv4 body (False: frozen)")
    first_order: bool = Field(
        False, description="treat inner-loop and fine-tuning gradients as constants"
    )


def gaussian_from(parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [..., 2d] into a mean [..., d] and a positive standard deviation [..., d]."""
    mean, raw_std = parameters.chunk(2, dim=-1)
    return mean, F.softplus(raw_std - STD_OFFSET) + MIN_STD


def sample_gaussian(mean: torch.Tensor, std: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """Reparameterised sample mean + std * eps, or the mean. eps [same shape as mean] comes
    from torch's global CPU RNG and is moved to mean's device: the same samples on every
    device."""
    if not stochastic:
        return mean
    noise = torch.randn(mean.shape, dtype=mean.dtype, device="cpu").to(mean.device)
    return mean + std * noise


def kl_to_standard_normal(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per element, averaged over all elements.

    mean, std [N, d]. Exact: 0.5 * (mean^2 + std^2 - 1) - log(std); the average over
    elements matches the scale of the paper's per-element Monte Carlo estimate, to which
    its ``kl_weight`` was tuned.
    """
    return (0.5 * (mean.pow(2) + std.pow(2) - 1.0) - std.log()).mean()


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the rows' correlation matrix and the identity.

    rows [R, C] (for LEO's decoder: one row per latent unit). Zero exactly when the rows
    are pairwise orthogonal; independent of the rows' lengths.
    """
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    correlation = (rows @ rows.T) / (norms @ norms.T)
    identity = torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)
    return (correlation - identity).pow(2).mean()


def linear_classifier_loss(
    weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of logits = features @ weights^T: weights [N, F], features [B, F]."""
    return F.cross_entropy(features @ weights.T, labels)


class LatentEmbeddingOptimization(EmbeddingLearner):
    """Encoder, relation network and decoder over Conv4 features; see the module docstring."""

    algorithm = "leo"
    # Latent steps (+ fine-tuning): steps=0 is "before adaptation".
    adapts_by_gradient: ClassVar[bool] = True
    batches_tasks: ClassVar[bool] = True

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.options = options
        self.embedding = FeatureExtractor(context)
        self.embedding.requires_grad_(options.train_body)
        feature_dim = self.embedding.feature_dim
        latent_dim = options.latent_dim
        self.encoder = nn.Linear(feature_dim, latent_dim)
        self.relation = nn.Sequential(
            nn.Linear(2 * latent_dim, options.relation_hidden),
            nn.ReLU(),
            nn.Linear(options.relation_hidden, options.relation_hidden),
            nn.ReLU(),
            nn.Linear(options.relation_hidden, 2 * latent_dim),
        )
        # No bias: labels are arbitrary per task, so a class-independent part of the weights
        # would add the same amount to every logit.
        self.decoder = nn.Linear(latent_dim, 2 * feature_dim, bias=False)
        inner_lr = torch.tensor(float(options.inner_lr))
        finetune_lr = torch.tensor(float(options.finetune_lr))
        if options.learn_inner_lrs:
            self.inner_lr = nn.Parameter(inner_lr)
            self.finetune_lr = nn.Parameter(finetune_lr)
        else:
            self.register_buffer("inner_lr", inner_lr)
            self.register_buffer("finetune_lr", finetune_lr)

    @property
    def default_adaptation_steps(self) -> int:
        """Latent inner steps of `adapt` when the caller names none: the training count."""
        return self.options.inner_steps

    # -- the generative model of classifier weights --------------------------------------

    def encode(
        self, support_features: torch.Tensor, support_y: torch.Tensor, n_way: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent Gaussian per class: support_features [S, F] -> mean, std [N, latent_dim].

        The relation network sees every ordered pair (i, j) of support examples; its output
        is averaged over j, then over the examples i of each class.
        """
        codes = self.encoder(support_features)
        count = codes.shape[0]
        pairs = torch.cat(
            [
                codes.unsqueeze(1).expand(count, count, -1),
                codes.unsqueeze(0).expand(count, count, -1),
            ],
            dim=-1,
        )
        per_example = self.relation(pairs).mean(dim=1)
        return gaussian_from(class_means(per_example, support_y, n_way))

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-weight Gaussian per class: latents [N, latent_dim] -> mean, std [N, F]."""
        return gaussian_from(self.decoder(latents))

    def decoder_rows(self) -> torch.Tensor:
        """The decoder matrix as [latent_dim, 2F]: row k is what latent unit k writes."""
        return self.decoder.weight.T

    # -- adaptation ------------------------------------------------------------------------

    def latent_inner_loop(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        latents: torch.Tensor,
        steps: int,
        stochastic: bool,
        keep_graph: bool,
    ) -> torch.Tensor:
        """``steps`` gradient steps on the latent codes [N, latent_dim]; returns new codes.

        Only the codes move: gradients are taken w.r.t. the codes alone (no ``.grad`` of any
        parameter is touched). ``stochastic`` decodes sampled weights at every step, as in
        meta-training; ``keep_graph`` keeps the steps differentiable (second order).
        """
        for _ in range(steps):
            with torch.enable_grad():
                current = latents if latents.requires_grad else latents.detach().requires_grad_()
                weights = sample_gaussian(*self.decode(current), stochastic=stochastic)
                loss = linear_classifier_loss(weights, support_features, support_y)
                (gradient,) = torch.autograd.grad(loss, current, create_graph=keep_graph)
            latents = latents - self.inner_lr * gradient
        return latents

    def finetune(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        weights: torch.Tensor,
        steps: int,
        keep_graph: bool,
    ) -> torch.Tensor:
        """``steps`` gradient steps on the classifier weights [N, F] themselves."""
        for _ in range(steps):
            with torch.enable_grad():
                current = weights if weights.requires_grad else weights.detach().requires_grad_()
                loss = linear_classifier_loss(current, support_features, support_y)
                (gradient,) = torch.autograd.grad(loss, current, create_graph=keep_graph)
            weights = weights - self.finetune_lr * gradient
        return weights

    # -- meta-training ---------------------------------------------------------------------

    def dropout_features(self, features: torch.Tensor) -> torch.Tensor:
        """Meta-training dropout on features [B, F] (skipped at rate 0: draws no numbers)."""
        if self.options.feature_dropout == 0.0:
            return features
        return F.dropout(features, self.options.feature_dropout, training=True)

    def regulariser_l2(self) -> torch.Tensor:
        """Sum of squared weight matrices of encoder, relation network and decoder."""
        modules = (self.encoder, self.relation, self.decoder)
        return sum(p.pow(2).sum() for m in modules for p in m.parameters() if p.dim() >= 2)

    def task_loss(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> TaskOutcome:
        """Meta-training objective of one task: the total loss, the query logits [Q, N] and
        the logged scalars ("total", "query_loss" and each regulariser term).

        support_x [S, 1, H, W], support_y [S], query_x [Q, 1, H, W], query_y [Q].
        """
        options = self.options
        n_way = check_support_labels(support_y)
        keep_graph = not options.first_order
        support_features = self.dropout_features(self.embedding(support_x))
        query_features = self.dropout_features(self.embedding(query_x))

        latent_mean, latent_std = self.encode(support_features, support_y, n_way)
        latents = sample_gaussian(latent_mean, latent_std, stochastic=True)
        adapted = self.latent_inner_loop(
            support_features, support_y, latents, options.inner_steps, True, keep_graph
        )
        weights = sample_gaussian(*self.decode(adapted), stochastic=True)
        weights = self.finetune(
            support_features, support_y, weights, options.finetune_steps, keep_graph
        )
        query_logits = query_features @ weights.T

        terms = {
            "query_loss": F.cross_entropy(query_logits, query_y),
            "kl": kl_to_standard_normal(latent_mean, latent_std),
            "encoder_penalty": (adapted.detach() - latents).pow(2).mean(),
            "orthogonality": orthogonality_penalty(self.decoder_rows()),
            "l2": self.regulariser_l2(),
        }
        total = (
            terms["query_loss"]
            + options.kl_weight * terms["kl"]
            + options.encoder_penalty_weight * terms["encoder_penalty"]
            + options.orthogonality_penalty_weight * terms["orthogonality"]
            + options.l2_penalty_weight * terms["l2"]
        )
        return TaskOutcome(total, query_logits, {"total": total, **terms})

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        stats = backward_mean_over_tasks(
            episodes,
            lambda task: self.task_loss(
                episodes.support_x[task],
                episodes.support_y[task],
                episodes.query_x[task],
                episodes.query_y[task],
            ),
        )
        stats.extra = {
            **(stats.extra or {}),
            "inner_lr": self.inner_lr.detach().item(),
            "finetune_lr": self.finetune_lr.detach().item(),
        }
        return stats

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """Deterministic adaptation: latent means, no sampling, no dropout.

        ``steps`` overrides the number of latent inner steps; ``steps=0`` means "before
        adaptation": the encoder's codes decoded as they are, without fine-tuning either.
        Needs autograd available (not inside ``torch.inference_mode``).
        """
        with torch.no_grad():
            weights = self.adapted_weights(self.embedding(support_x), support_y, steps)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.embedding(query_x) @ weights.T

        return predict

    def adapt_many(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """`adapt` for T tasks: support_x [T, S, 1, H, W], support_y [T, S]; the images of all
        tasks are embedded together (`FeatureExtractor.embed_tasks`), each task adapted on
        its own. Returns predictor(query_x [T, Q, 1, H, W]) -> logits [T, Q, N]."""
        with torch.no_grad():
            features = self.embedding.embed_tasks(support_x)
            weights = [
                self.adapted_weights(task_features, labels, steps)
                for task_features, labels in zip(features, support_y, strict=True)
            ]

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            check_query_tasks(query_x, len(weights))
            with torch.no_grad():
                features = self.embedding.embed_tasks(query_x)
                return torch.stack([x @ w.T for x, w in zip(features, weights, strict=True)])

        return predict

    def adapt_before_after(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> BeforeAfterPredictor:
        """`adapt_many` with 0 and with ``steps`` latent steps from one embedding of the
        support and of the query images (the body is not adapted): predictor(query_x
        [T, Q, 1, H, W]) -> (logits before, logits after), each [T, Q, N]."""
        with torch.no_grad():
            features = self.embedding.embed_tasks(support_x)
            weights = [
                (self.adapted_weights(x, y, 0), self.adapted_weights(x, y, steps))
                for x, y in zip(features, support_y, strict=True)
            ]

        def predict(query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            check_query_tasks(query_x, len(weights))
            with torch.no_grad():
                features = self.embedding.embed_tasks(query_x)
                logits = [(x @ w0.T, x @ w.T) for x, (w0, w) in zip(features, weights, strict=True)]
            before, after = zip(*logits, strict=True)
            return torch.stack(before), torch.stack(after)

        return predict

    def adapted_weights(
        self, support_features: torch.Tensor, support_y: torch.Tensor, steps: int | None
    ) -> torch.Tensor:
        """A task's classifier weights [N, F] from its support features [S, F] and labels
        [S]: encoded latent means, ``steps`` latent steps (default ``inner_steps``), decoded
        means, then the fine-tuning steps (none at ``steps=0``)."""
        n_way = check_support_labels(support_y)
        inner_steps = self.options.inner_steps if steps is None else steps
        finetune_steps = self.options.finetune_steps if inner_steps > 0 else 0
        latents, _ = self.encode(support_features, support_y, n_way)
        latents = self.latent_inner_loop(
            support_features, support_y, latents, inner_steps, False, False
        )
        weights, _ = self.decode(latents)
        return self.finetune(support_features, support_y, weights, finetune_steps, False)


def build(options: Options, context: BuildContext) -> LatentEmbeddingOptimization:
    return LatentEmbeddingOptimization(options, context)
