"""Generated head weights (``algorithm: generated_head``): the seed project's design that
it called "Meta Networks". It is NOT Munkhdalai & Yu's Meta Networks (2017): that method,
with its external memory, attention over the support set and the paper's layer
augmentation, is ``algorithm: meta_networks`` (`metalab.algorithms.meta_networks`). This
design borrows the paper's idea of fast weights generated from loss gradients, but only
to produce a task's hidden-layer and classifier weights in one pass; at the start of
training its classifier row of a class is a step along minus the zero classifier's loss
gradient, i.e. the class's mean representation minus a share of the support set's (a
prototype classifier with a linear read-out), and the generators learn offsets from it.

The base learner is the Conv4 body f (slow weights) followed by a hidden layer and a
classifier layer over the task's N classes. Fast weights come from loss gradients
("meta-information"), as in the paper, without any gradient-descent step:

1. Task-level fast weights. The hidden layer has slow weights W; the gradient G of a
   slow-only nearest-class-mean loss on the support set w.r.t. W is turned, coordinate
   by coordinate, into fast weights W* = -d(G, W) * G (d: a small network giving each
   coordinate a signed, gradient- and weight-dependent step), and the layer computes
   relu((W + W*) h + b). (The paper's layer augmentation uses a parallel branch
   relu(W h) + relu(W* h); over Conv4's non-negative features such a branch starts dead,
   all its pre-activations having the sign of W*'s mean, so the fast weights are added
   inside the non-linearity instead.)
2. Class-level fast weights for the classifier (the seed's U, V, e). Each support example
   i gets a memory entry r_i = tanh(U z_i + V g_i + e), where z_i is its representation
   and g_i the gradient of its own loss w.r.t. z_i; the class's entries are averaged and a
   weight generator and a bias generator produce that class's classifier row and bias.

Prediction is one pass: logits = z(x) W_out^T + b_out. The gradients above are inputs to
the generators; nothing is adapted by gradient descent at test time.
"""

from __future__ import annotations

import math

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
    check_support_labels,
    class_counts,
    class_means,
    squared_euclidean_logits,
)


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: generated_head``."""

    model_config = ConfigDict(extra="forbid")

    hidden_dim: int = Field(
        64, ge=1, le=4096, description="width of the base learner's hidden layer and of U, V, e"
    )
    generator_hidden: int = Field(
        128, ge=2, le=4096, description="hidden width of the weight generator (bias: half)"
    )
    task_fast_weights: bool = Field(
        True, description="add gradient-generated task fast weights to the hidden layer's weights"
    )
    task_generator_hidden: int = Field(
        16, ge=1, le=256, description="hidden width of the per-coordinate task-weight generator"
    )
    second_order: bool = Field(
        True,
        description="meta-train through the meta-information gradients (False: treat them "
        "as constants, cheaper)",
    )
    task_dropout_rates: TaskDropoutRates = None


def nearest_mean_loss(
    representations: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of nearest-class-mean logits on the support set itself.

    representations [S, H], labels [S]; ``means`` [N, H] defaults to the class means of
    ``representations``. A loss that exists for any way count without class-specific slow
    weights, so its gradients can serve as meta-information.
    """
    if means is None:
        means = class_means(representations, labels, n_way)
    logits = squared_euclidean_logits(representations, means)
    return F.cross_entropy(logits, labels, reduction="sum")


def example_loss_gradients(
    representations: torch.Tensor, labels: torch.Tensor, n_way: int, keep_graph: bool
) -> torch.Tensor:
    """Gradient of each support example's own loss w.r.t. its representation: [S, H].

    The class means enter as functions of ``representations`` but are not differentiated
    in the inner gradient: the gradient is taken w.r.t. a copy used only in the examples'
    own position. With ``keep_graph`` the result stays differentiable in everything,
    means included (detaching the means instead would silently bias the meta-gradient).
    """
    representations = differentiable_input(representations, keep_graph)
    with torch.enable_grad():
        means = class_means(representations, labels, n_way)
        own_position = representations.clone()
        loss = nearest_mean_loss(own_position, labels, n_way, means=means)
        (gradients,) = torch.autograd.grad(loss, own_position, create_graph=keep_graph)
    return gradients


def output_layer_gradient(
    representations: torch.Tensor, labels: torch.Tensor, n_way: int, keep_graph: bool
) -> torch.Tensor:
    """Gradient of the summed support loss w.r.t. a zero classifier layer: [N, H].

    representations [S, H]. With all-zero weights every class has probability 1/N, so
    row c is sum_i (1/N - [y_i = c]) z_i: minus the class's summed representation plus its
    share of the whole support set's, the paper's meta-information for an output layer.
    """
    representations = differentiable_input(representations, keep_graph)
    zero_weights = representations.new_zeros(n_way, representations.shape[1]).requires_grad_()
    with torch.enable_grad():
        logits = representations @ zero_weights.T
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, zero_weights, create_graph=keep_graph)
    return gradient


def differentiable_input(tensor: torch.Tensor, keep_graph: bool) -> torch.Tensor:
    """``tensor`` itself when its graph is to be kept (and exists), else a detached leaf
    that requires grad, so a gradient w.r.t. it can be taken even under ``no_grad``."""
    if keep_graph and tensor.requires_grad:
        return tensor
    return tensor.detach().requires_grad_()


class GeneratedHeadLearner(OnePassLearner):
    """Slow weights (body, hidden layer, U, V, e, generators) + generated fast weights.

    `adapt` needs autograd available (not inside ``torch.inference_mode``): the
    meta-information is a loss gradient, computed even under ``torch.no_grad``.
    """

    algorithm = "generated_head"

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        self.embedding = FeatureExtractor(context, options.task_dropout_rates)
        feature_dim = self.embedding.feature_dim
        hidden = options.hidden_dim
        self.slow_layer = nn.Linear(feature_dim, hidden)
        self.task_fast_weights = options.task_fast_weights
        # d: maps (normalised gradient, slow weight) of one coordinate to that coordinate's
        # step; the fast weight is step * gradient, so no gradient means no fast weight (a
        # free constant would shift every weight alike and can kill the whole layer).
        self.task_generator = nn.Sequential(
            nn.Linear(2, options.task_generator_hidden),
            nn.ReLU(),
            nn.Linear(options.task_generator_hidden, 1),
        )
        # Zero fast weights at the start: training begins from the slow network.
        nn.init.zeros_(self.task_generator[-1].weight)
        nn.init.zeros_(self.task_generator[-1].bias)
        bound = 1.0 / math.sqrt(hidden)
        self.U = nn.Parameter(torch.empty(hidden, hidden).uniform_(-bound, bound))
        self.V = nn.Parameter(torch.empty(hidden, hidden).uniform_(-bound, bound))
        self.e = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))
        # log of the step size along the output-layer gradient (starts at 1; stays positive).
        self.log_output_step = nn.Parameter(torch.tensor(0.0))
        self.weight_generator = nn.Sequential(
            nn.Linear(hidden, options.generator_hidden),
            nn.ReLU(),
            nn.Linear(options.generator_hidden, hidden),
        )
        self.bias_generator = nn.Sequential(
            nn.Linear(hidden, options.generator_hidden // 2),
            nn.ReLU(),
            nn.Linear(options.generator_hidden // 2, 1),
        )
        # The generators start silent: the first classifier is the gradient step alone,
        # which already separates the classes, rather than that plus random offsets.
        for generator in (self.weight_generator, self.bias_generator):
            nn.init.zeros_(generator[-1].weight)
            nn.init.zeros_(generator[-1].bias)
        self.second_order = options.second_order

    def task_fast_weight_matrix(
        self, support_features: torch.Tensor, support_y: torch.Tensor, n_way: int, keep_graph: bool
    ) -> torch.Tensor:
        """Fast weights W* [H, D] of the hidden layer from the support set [S, D].

        ``keep_graph``: differentiate through the gradient G (second-order meta-training);
        otherwise G is a constant input to the generator.
        """
        slow_weight = differentiable_input(self.slow_layer.weight, keep_graph)
        if not keep_graph:
            support_features = support_features.detach()
        with torch.enable_grad():
            slow_representations = F.relu(
                F.linear(support_features, slow_weight, self.slow_layer.bias)
            )
            loss = nearest_mean_loss(slow_representations, support_y, n_way)
            (gradient,) = torch.autograd.grad(loss, slow_weight, create_graph=keep_graph)
        # The generator sees the gradient's direction per coordinate; its overall size varies
        # by orders of magnitude between tasks. eps inside the sqrt keeps the derivative finite.
        gradient = gradient / (gradient.pow(2).mean() + 1e-12).sqrt()
        coordinates = torch.stack([gradient, self.slow_layer.weight], dim=-1)
        # In units of the slow weights' size, so the generator's output scale is the same
        # for any layer width.
        scale = self.slow_layer.weight.pow(2).mean().sqrt()
        return -self.task_generator(coordinates).squeeze(-1) * gradient * scale

    def represent(self, features: torch.Tensor, fast_weight: torch.Tensor | None) -> torch.Tensor:
        """features [B, D] -> z [B, H]: hidden layer with slow (+ fast, if any) weights."""
        weight = self.slow_layer.weight
        if fast_weight is not None:
            weight = weight + fast_weight
        return F.relu(F.linear(features, weight, self.slow_layer.bias))

    def classifier(
        self,
        support_representations: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        keep_graph: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated classifier (weights [N, H], bias [N]) from support z [S, H]."""
        example_gradients = example_loss_gradients(
            support_representations, support_y, n_way, keep_graph
        )
        memory = torch.tanh(
            support_representations @ self.U.T + example_gradients @ self.V.T + self.e
        )
        class_memory = class_means(memory, support_y, n_way)
        # Fast weights of a class = a learned step along minus the output layer's gradient
        # (per support example of the class; the paper's simplest use of meta-information)
        # + the generator's output from the class memory.
        shots = class_counts(support_y, n_way).to(memory.dtype)
        descent = -output_layer_gradient(support_representations, support_y, n_way, keep_graph)
        weight = self.log_output_step.exp() * descent / shots[:, None] + self.weight_generator(
            class_memory
        )
        bias = self.bias_generator(class_memory).squeeze(-1)
        return weight, bias

    def generate(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        keep_graph: bool,
        n_way: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """All fast weights of a task: (hidden W* [H, D] or None, classifier [N, H], bias [N]).

        support_features [S, D], support_y [S]; ``n_way``: the way count when the caller
        has checked the labels already (`check_support_labels`).
        """
        if n_way is None:
            n_way = check_support_labels(support_y)
        fast_weight = None
        if self.task_fast_weights:
            fast_weight = self.task_fast_weight_matrix(
                support_features, support_y, n_way, keep_graph
            )
        support_representations = self.represent(support_features, fast_weight)
        weight, bias = self.classifier(support_representations, support_y, n_way, keep_graph)
        return fast_weight, weight, bias

    def task_classifier(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        meta_training: bool,
    ) -> QueryClassifier:
        """Fast weights from support features [S, D]; queries [Q, D] -> logits [Q, N].

        Meta-training differentiates through the meta-information gradients when
        ``second_order``; `generate` re-enables autograd for them under ``no_grad``.
        """
        keep_graph = meta_training and self.second_order
        fast_weight, weight, bias = self.generate(support_features, support_y, keep_graph, n_way)
        return lambda query_features: self.represent(query_features, fast_weight) @ weight.T + bias


def build(options: Options, context: BuildContext) -> GeneratedHeadLearner:
    return GeneratedHeadLearner(options, context)
