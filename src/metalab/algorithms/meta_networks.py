"""Meta Networks (Munkhdalai & Yu, ICML 2017), as the paper describes them.

Two conv nets of the paper's Omniglot shape (``conv_layers`` blocks of Conv3x3(C, no
bias) + ReLU + MaxPool2, then a hidden fully connected layer and an output layer):

* the base learner b (slow weights W) classifies;
* the dynamic representation learner u (slow weights Q) embeds images into keys.

Every layer of both is *layer-augmented*: it has slow weights and fast weights, and its
output is the sum of the two paths, ReLU(slow) + ReLU(fast) for hidden layers, slow +
fast for b's logits and u's (linear) key layer. A meta learner of two per-coordinate
networks turns loss gradients (the paper's meta information) into fast weights:

1. Task-level fast weights Q* of u (d, an LSTM over T gradients). The support set's
   representation loss on u's slow weights is cut into T parts; each part's gradient
   w.r.t. Q is one step of d's input sequence; d's output after T steps is Q*.
2. Example-level fast weights of b (m, an MLP). Each support example i's loss on b's
   slow weights gives the gradient of W; m maps it to W*_i, stored in the memory M with
   the key r'_i = u(Q, Q*, x'_i).
3. A query x reads its fast weights from M by attention: a = softmax(scale *
   cosine(u(Q, Q*, x), r'_i) over i) and W* = a^T M; b(W, W*, x) gives its logits.

Meta-training minimises the query cross-entropy over W, Q and the parameters of d and m
(Algorithm 1). No gradient step is taken at test time: the same forward pass adapts.

m and d act on every coordinate of a gradient separately (shared weights), on the
gradient preprocessed as in the reference code (log magnitude / k and a clipped scaled
sign, k = 7; the paper's appendix credits Andrychowicz et al. 2016), with separate
networks for the conv weights and the fully connected weights, as the reference code.

Deviations from the paper (see `Options` for the switches):

* Sizes: channels = ``model.hidden`` (paper 64) and the hidden FC width (paper 64) are
  set per experiment; m and d keep the paper's 20 hidden units.
* ``second_order: false`` (default) treats the meta-information gradients as constants,
  as the authors' reference code does (the paper does not say); ``true``
  differentiates through them (exact meta-gradients, slower).
* ``representation_loss``: ``pairs`` (default) is the paper's embedding loss on support
  pairs with an auxiliary same-class label, here binary cross-entropy on ``pair_scale`` x
  the cosine of the two keys (the paper leaves the loss's form open), over all unordered
  pairs of the support set cut in T parts in a fixed order (the paper samples T pairs; a
  fixed order keeps test time free of random numbers). In 1-shot tasks every pair is of
  two classes. ``cross_entropy`` is the reference code's loss: u's own softmax layer over
  the support labels, the support set cut in T parts.
* ``attention_scale`` multiplies the cosine before the softmax (paper: 1, no scale).
* ``scale_fast_weights`` (default true) multiplies each layer's generated fast weights by
  that layer's slow-weight init scale 1/sqrt(fan_in) (paper: unscaled), so that m and d
  work in the same units for every layer width.
* Initialisation: He-normal conv and hidden FC weights and a near-zero output layer (the
  reference code: Chainer's LeCun normal; without BatchNorm 5 blocks then start with
  logits ~0 and learn slowly); the last layers of m and d start near zero (std 1e-3,
  bias 0) so that training starts from the slow networks (the reference code: default
  init, whose near-constant fast weights blew up the activations over 5 layers here).
* The output layer has ``output_units`` (default: the training way count) units; an N-way
  task uses the first N (labels are arbitrary per task), more ways are an error. Units
  beyond the training way count keep their near-zero slow weights: fast weights fill
  them.
* u's softmax layer (``cross_entropy`` only) shapes the gradients d reads; first order,
  nothing trains it (as in the reference code, where it keeps its initial weights).
* fp32 only.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
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
from metalab.algorithms.embedding import TaskOutcome, backward_mean_over_tasks, check_support_labels
from metalab.algorithms.meta_networks_parts import (
    GROUPS,
    AugmentedConvNet,
    TaskMemory,
    attention,
    augmented_features,
    fan_in_scale,
    linear,
    preprocess_gradients,
    representation_pairs,
)
from metalab.algorithms.precision import Precision, autocast
from metalab.data.episodes import Episodes


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: meta_networks``."""

    model_config = ConfigDict(extra="forbid")

    conv_layers: int = Field(5, ge=1, le=8, description="conv blocks of b and u (paper: 5)")
    fc_units: int = Field(64, ge=1, le=4096, description="width of the hidden FC layer (paper 64)")
    meta_hidden: int = Field(
        20, ge=1, le=1024, description="hidden units of m (MLP) and d (LSTM) (paper: 20)"
    )
    representation_loss: Literal["pairs", "cross_entropy"] = Field(
        "pairs",
        description="u's loss whose gradients d reads: verification on support pairs "
        "(paper) or softmax cross-entropy on the support labels (reference code)",
    )
    representation_steps: int = Field(
        5, ge=1, le=100, description="T: gradients (parts of the support set) d reads"
    )
    pair_scale: float = Field(
        5.0, gt=0.0, le=1000.0, description="pairs loss: logit of 'same class' = scale x cosine"
    )
    attention_scale: float = Field(
        1.0, gt=0.0, le=1000.0, description="softmax(scale x cosine) over the memory (paper: 1)"
    )
    gradient_preprocessing_k: float | None = Field(
        7.0,
        gt=0.0,
        le=100.0,
        description="k of the log/sign gradient preprocessing (reference: 7); null = raw "
        "gradient as m's and d's one input",
    )
    scale_fast_weights: bool = Field(
        True, description="scale fast weights by the layer's 1/sqrt(fan_in) (paper: no)"
    )
    second_order: bool = Field(
        False,
        description="differentiate through the meta-information gradients (reference "
        "code: no, they are constants)",
    )
    train_n_way: int | None = Field(
        None, ge=2, le=1000, description="ways of the training tasks; None = train.n_way"
    )
    output_units: int | None = Field(
        None,
        ge=2,
        le=1000,
        description="output units of b (tasks of up to this many ways; an N-way task uses "
        "the first N); None = the training way count",
    )


#: The two weight groups that get their own m and d (as in the reference code).
class MetaNetworks(MetaLearner):
    """b (``base``), u (``representation``) and the meta learner (``d_lstm``/``d_out`` and
    ``m``, one of each per weight group); see the module docstring."""

    algorithm = "meta_networks"
    batches_tasks: ClassVar[bool] = True

    def __init__(self, options: Options, context: BuildContext) -> None:
        super().__init__()
        if context.model.name != "conv4" or context.model.downsample != "maxpool":
            raise ValueError(
                "meta_networks builds its own conv nets: model.name must be conv4 and "
                "model.downsample maxpool (model.hidden sets their channels)"
            )
        if context.precision != "fp32":
            raise ValueError(
                f"meta_networks runs in fp32 only: train.precision must be fp32, got "
                f"{context.precision}"
            )
        self.precision: Precision = context.precision
        self.options = options
        self.train_n_way = options.train_n_way or context.n_way
        self.output_units = options.output_units or self.train_n_way
        if self.output_units < self.train_n_way:
            raise ValueError(
                f"output_units ({self.output_units}) must be at least the training way count "
                f"({self.train_n_way})"
            )
        channels, size, layers = context.model.hidden, context.image_size, options.conv_layers
        self.base = AugmentedConvNet(channels, layers, options.fc_units, size, self.output_units)
        # u's output layer exists only for the reference code's cross-entropy loss.
        u_outputs = self.output_units if options.representation_loss == "cross_entropy" else None
        self.representation = AugmentedConvNet(channels, layers, options.fc_units, size, u_outputs)
        inputs = 1 if options.gradient_preprocessing_k is None else 2
        hidden = options.meta_hidden
        # d: per-coordinate LSTM over u's T gradients, then a linear read-out of its state.
        self.d_lstm = nn.ModuleDict({g: nn.LSTMCell(inputs, hidden) for g in GROUPS})
        self.d_out = nn.ModuleDict({g: nn.Linear(hidden, 1) for g in GROUPS})
        # m: per-coordinate MLP of one example's gradient (reference: 2 -> 20 -> 20 -> 1).
        self.m = nn.ModuleDict(
            {
                g: nn.Sequential(
                    nn.Linear(inputs, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, 1),
                )
                for g in GROUPS
            }
        )
        # Small last layers: fast weights start near zero (the slow network alone) but not
        # at zero, where ReLU(conv(h, 0)) passes no gradient to them. A free start (the
        # reference code's) generates the same value for most coordinates: such a coherent
        # weight scales a layer's output by its fan-in and blows up 5 stacked layers.
        for last in [*(self.m[g][-1] for g in GROUPS), *(self.d_out[g] for g in GROUPS)]:
            nn.init.normal_(last.weight, std=1e-3)
            nn.init.zeros_(last.bias)

    @property
    def model(self) -> nn.Module:
        """The base learner b (``body``: its conv weights)."""
        return self.base

    @property
    def conv_layers(self) -> int:
        return len(self.base.body)

    # -- the two networks as functions of their weights ------------------------------------

    def base_logits(
        self,
        x: torch.Tensor,
        n_way: int,
        fast: list[torch.Tensor] | None,
        slow: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """b(W, W*, x): x [B, 1, S, S] -> logits [B, n_way] (the first n_way outputs).

        ``fast``: b's fast weights in layer order, shared or per example ([B, *shape]);
        None: the slow network alone. ``slow`` replaces b's slow weights (same layout)."""
        if n_way > self.output_units:
            raise ValueError(f"meta_networks has {self.output_units} output units, got {n_way}-way")
        slow = self.base.weights() if slow is None else slow
        layers = self.conv_layers
        h = augmented_features(x, slow[:layers], None if fast is None else fast[:layers])
        hidden = F.relu(linear(h, slow[layers]))
        if fast is not None:
            hidden = hidden + F.relu(linear(h, fast[layers]))
        logits = linear(hidden, slow[layers + 1])
        if fast is not None:
            logits = logits + linear(hidden, fast[layers + 1])
        return logits[:, :n_way]

    def representation_keys(
        self,
        x: torch.Tensor,
        fast: list[torch.Tensor] | None,
        slow: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """u(Q, Q*, x): x [B, 1, S, S] -> keys [B, H]; the key layer is linear (slow +
        fast), as in the reference code. ``fast``: Q* (conv weights, key layer) or None."""
        slow = self.representation.weights() if slow is None else slow
        layers = self.conv_layers
        h = augmented_features(x, slow[:layers], None if fast is None else fast[:layers])
        keys = linear(h, slow[layers])
        if fast is not None:
            keys = keys + linear(h, fast[layers])
        return keys

    # -- the meta learner -------------------------------------------------------------------

    def generate(
        self, kind: Literal["m", "d"], gradients: list[torch.Tensor], scales: list[float]
    ) -> list[torch.Tensor]:
        """Fast weights from gradients, coordinate by coordinate.

        ``gradients``: one tensor per layer, [E, *shape]: for m, E examples (one fast
        weight each, [E, *shape]); for d, E = T steps of one sequence (one fast weight,
        [*shape]). Layers before `conv_layers` use the conv networks, the rest the fc ones.
        ``scales``: per layer output factors (1/sqrt(fan_in), or 1)."""
        k = self.options.gradient_preprocessing_k
        layers = self.conv_layers
        out: list[torch.Tensor] = []
        for group, chosen in (("conv", gradients[:layers]), ("fc", gradients[layers:])):
            if not chosen:
                continue
            steps = chosen[0].shape[0]
            flat = torch.cat([g.reshape(steps, -1) for g in chosen], dim=1)  # [E, P_group]
            inputs = preprocess_gradients(flat, k)  # [E, P_group, 1 or 2]
            if kind == "m":
                generated = self.m[group](inputs).squeeze(-1)  # [E, P_group]
            else:
                cell = self.d_lstm[group]
                state = None
                for step in inputs:  # step [P_group, inputs]
                    state = cell(step, state)
                generated = self.d_out[group](state[0]).squeeze(-1).unsqueeze(0)  # [1, P]
            sizes = [g[0].numel() for g in chosen]
            for piece, g in zip(generated.split(sizes, dim=1), chosen, strict=True):
                shape = g.shape[1:] if kind == "d" else g.shape
                out.append(piece.reshape(shape))
        return [weight * scale for weight, scale in zip(out, scales, strict=True)]

    def fast_weight_scales(self, weights: list[torch.Tensor]) -> list[float]:
        if not self.options.scale_fast_weights:
            return [1.0] * len(weights)
        return [fan_in_scale(w) for w in weights]

    @staticmethod
    def differentiable(weights: list[torch.Tensor], keep_graph: bool) -> list[torch.Tensor]:
        """The slow weights themselves when the meta-gradient goes through the gradients
        taken w.r.t. them (second order), else detached leaves: the gradients are then
        constants, as in the reference code. Either way a gradient w.r.t. them exists,
        also under ``torch.no_grad``."""
        if keep_graph and all(w.requires_grad for w in weights):
            return weights
        return [w.detach().requires_grad_() for w in weights]

    def representation_fast_weights(
        self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int, keep_graph: bool
    ) -> list[torch.Tensor]:
        """Q* = d(G, {grad_Q L_t}, t = 1..T) for u's conv weights and key layer (each of its
        slow weight's shape). support_x [S, 1, H, W], support_y [S]."""
        options = self.options
        layers = self.conv_layers
        with torch.enable_grad():
            weights = self.differentiable(self.representation.weights(), keep_graph)
            if options.representation_loss == "pairs":
                keys = self.representation_keys(support_x, None, weights)
                losses = representation_pairs(
                    keys, support_y, options.pair_scale, options.representation_steps
                )
            else:  # the reference code: u's softmax layer, the support set in T parts
                features = augmented_features(support_x, weights[:layers], None)
                hidden = F.relu(linear(features, weights[layers]))
                logits = linear(hidden, weights[layers + 1])[:, :n_way]
                parts = torch.arange(support_x.shape[0], device=support_x.device).tensor_split(
                    min(options.representation_steps, support_x.shape[0])
                )
                losses = [F.cross_entropy(logits[p], support_y[p]) for p in parts]
            # u's output layer (cross_entropy only) gets no fast weights: keys do not use it.
            used = weights[: layers + 1]
            steps = [
                torch.autograd.grad(loss, used, create_graph=keep_graph, retain_graph=True)
                for loss in losses
            ]
        gradients = [torch.stack([step[i] for step in steps]) for i in range(len(used))]
        return self.generate("d", gradients, self.fast_weight_scales(used))

    def example_fast_weights(
        self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int, keep_graph: bool
    ) -> torch.Tensor:
        """M: W*_i = m(Z, grad_W loss(b(W, x'_i), y'_i)) per support example, flattened in
        layer order: support_x [S, 1, H, W], support_y [S] -> [S, P]."""
        count = support_x.shape[0]
        with torch.enable_grad():
            weights = self.differentiable(self.base.weights(), keep_graph)
            # One copy of W per example: the gradient w.r.t. copy i of the summed loss is
            # example i's own gradient (one batched pass instead of S backward passes).
            copies = [w.unsqueeze(0).expand(count, *w.shape) for w in weights]
            per_example = self.base_logits_per_example(support_x, n_way, copies)
            loss = F.cross_entropy(per_example, support_y, reduction="sum")
            gradients = torch.autograd.grad(loss, copies, create_graph=keep_graph)
        fast = self.generate("m", list(gradients), self.fast_weight_scales(weights))
        return torch.cat([w.reshape(count, -1) for w in fast], dim=1)

    def base_logits_per_example(
        self, x: torch.Tensor, n_way: int, weights: list[torch.Tensor]
    ) -> torch.Tensor:
        """The slow network b with per-example weights ([B, *shape] each): x [B, 1, S, S]
        -> logits [B, n_way]."""
        layers = self.conv_layers
        h = augmented_features(x, weights[:layers], None)
        hidden = F.relu(linear(h, weights[layers]))
        return linear(hidden, weights[layers + 1])[:, :n_way]

    # -- a task --------------------------------------------------------------------------------

    def memorise(
        self, support_x: torch.Tensor, support_y: torch.Tensor, keep_graph: bool
    ) -> TaskMemory:
        """Algorithm 1 up to the query loop: Q*, the keys and the memory of a support set
        (support_x [S, 1, H, W], support_y int64 [S] in 0..N-1, checked)."""
        n_way = check_support_labels(support_y)
        if n_way > self.output_units:
            raise ValueError(f"meta_networks has {self.output_units} output units, got {n_way}-way")
        # The run's autocast region on the inputs' device (fp32 only: a disabled region),
        # as every learner opens one.
        with autocast(self.precision, support_x.device.type):
            representation_fast = self.representation_fast_weights(
                support_x, support_y, n_way, keep_graph
            )
            keys = self.representation_keys(support_x, representation_fast)
            memory = self.example_fast_weights(support_x, support_y, n_way, keep_graph)
        return TaskMemory(representation_fast, keys, memory, n_way)

    def read(
        self, task: TaskMemory, query_x: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each query's fast weights: softmax attention over the memory by the cosine of its
        key u(Q, Q*, x) with the support keys. query_x [Q, 1, H, W] -> (b's fast weights
        per query, each [Q, *shape], and the attention weights [Q, S])."""
        keys = self.representation_keys(query_x, task.representation_fast)
        weights = attention(keys, task.keys, self.options.attention_scale)
        flat = weights @ task.memory  # [Q, P]
        shapes = [w.shape for w in self.base.weights()]
        pieces = flat.split([math.prod(shape) for shape in shapes], dim=1)
        fast = [p.reshape(-1, *shape) for p, shape in zip(pieces, shapes, strict=True)]
        return fast, weights

    def query_logits(self, task: TaskMemory, query_x: torch.Tensor) -> torch.Tensor:
        """b(W, W*_q, x_q) for each query: query_x [Q, 1, H, W] -> logits [Q, N]."""
        with autocast(self.precision, query_x.device.type):
            fast, _ = self.read(task, query_x)
            return self.base_logits(query_x, task.n_way, fast)

    # -- the MetaLearner interface -------------------------------------------------------------

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """Mean query cross-entropy over the tasks, differentiated into W, Q, d and m."""

        def task_outcome(task: int) -> TaskOutcome:
            memory = self.memorise(
                episodes.support_x[task], episodes.support_y[task], self.options.second_order
            )
            logits = self.query_logits(memory, episodes.query_x[task])
            loss = F.cross_entropy(logits, episodes.query_y[task])
            return TaskOutcome(loss, logits, {"query_loss": loss})

        return backward_mean_over_tasks(episodes, task_outcome)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """One pass over the support set (``steps`` ignored: no gradient descent). Needs
        autograd available (not ``torch.inference_mode``): the meta information is a
        gradient, taken even under ``torch.no_grad``."""
        with torch.no_grad():
            memory = self.memorise(support_x, support_y, keep_graph=False)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.query_logits(memory, query_x)

        return predict

    def adapt_many(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """`adapt` for T tasks (support_x [T, S, 1, H, W], support_y [T, S]); every task is
        computed on its own (no BatchNorm, nothing shared), so the logits [T, Q, N] equal
        those of `adapt` task by task. Draws no random numbers."""
        with torch.no_grad():
            memories = [
                self.memorise(x, y, keep_graph=False)
                for x, y in zip(support_x, support_y, strict=True)
            ]

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            check_query_tasks(query_x, len(memories))
            with torch.no_grad():
                return torch.stack(
                    [self.query_logits(m, x) for m, x in zip(memories, query_x, strict=True)]
                )

        return predict


def build(options: Options, context: BuildContext) -> MetaNetworks:
    return MetaNetworks(options, context)
