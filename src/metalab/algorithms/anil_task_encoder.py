"""ANIL with a task encoder (``algorithm: anil_task_encoder``): the seed project's design
on the MAML core, which the seed called "TAML". It is not Jamal & Qi's Task-Agnostic
Meta-Learning (that is ``algorithm: taml``, `metalab.algorithms.taml`); it was TAML's
``variant: encoder`` until it got its own name.

A shared body f (Conv4) embeds the images; a task encoder reads the support set's
embeddings and produces, per task,

* a FiLM modulation of the embedding, f(x) * scale + shift (scale, shift [D]), and
* inner learning rates of the head: one per feature for the weight [D] and one for the
  bias, each inner_lr x a multiplier in (0, 2).

The inner loop then adapts only the linear head (ANIL-style) on the modulated features
with those rates, first or second order. The task encoder is an encoder (per support
example), class means, a relation network over all ordered pairs of class codes (averaged,
so any way count and label order work) and a decoder, as in LEO. Its decoder starts at
zero (scale 1, shift 0, multipliers 1), so training starts exactly from ANIL.

FiLM on the head's input is folded into the head: W (f * s + b_s) + b =
(W * s) f + (W b_s + b), so the body features are computed once per task and split, and
the inner loop differentiates through the modulation like through any head weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from metalab.algorithms.base import (
    BeforeAfterPredictor,
    BuildContext,
    TaskBatchPredictor,
    check_query_tasks,
)
from metalab.algorithms.functional import (
    ParameterDict,
    inner_loop,
    linear_per_task,
    per_task_cross_entropy,
    stack_for_tasks,
    weighted_query_losses,
    zero_head,
)
from metalab.algorithms.maml import MAMLLearner
from metalab.algorithms.maml_options import Options as MAMLOptions
from metalab.algorithms.precision import Precision
from metalab.algorithms.task_forward import TaskDropoutMasks, body_features
from metalab.algorithms.task_runner import TaskOutcome
from metalab.models import build_model

HEAD_NAMES = ("head.weight", "head.bias")


class Options(MAMLOptions):
    """``experiments.<name>.options`` of algorithm ``anil_task_encoder``: the MAML core's
    options (head-only adaptation by default, and only that) plus ``encoder_width``."""

    # The task encoder's own head loop draws no learned noise (`metalab.algorithms.learned_noise`).
    learned_noise_supported: ClassVar[bool] = False

    adapt_parameters: Literal["all", "head"] = Field(
        "head", description="what the inner loop adapts: head only (this learner's design)"
    )
    encoder_width: int = Field(
        64, ge=1, le=4096, description="width of the task encoder and relation network"
    )

    @model_validator(mode="after")
    def _head_loop_consistent(self) -> Options:
        """The learner runs its own head loop with generated rates and its own head start."""
        if self.adapt_parameters != "head":
            raise ValueError(
                "anil_task_encoder adapts only the head: adapt_parameters must be head"
            )
        if self.inner_lr_mode != "fixed":
            raise ValueError(
                "anil_task_encoder generates the head's inner learning rates per task: "
                "inner_lr_mode must be fixed (inner_lr is their base value)"
            )
        if self.zero_head:
            raise ValueError("zero_head is not available for anil_task_encoder (own head start)")
        return self


@dataclass
class TaskModulation:
    """What the task encoder produces for T tasks (D = feature size).

    scale, shift [T, D]: features become f * scale + shift.
    weight_lr_multiplier [T, D], bias_lr_multiplier [T, 1]: multiply ``inner_lr``.
    """

    scale: Tensor
    shift: Tensor
    weight_lr_multiplier: Tensor
    bias_lr_multiplier: Tensor


class TaskEncoder(nn.Module):
    """Support embeddings [T, S, D] and labels [T, S] -> a `TaskModulation` of T tasks."""

    def __init__(self, feature_dim: int, width: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.encoder = nn.Sequential(nn.Linear(feature_dim, width), nn.ReLU())
        self.relation = nn.Sequential(
            nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        # scale offset, shift and weight-lr logits [D] each, bias-lr logit [1].
        self.decoder = nn.Linear(width, 3 * feature_dim + 1)
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, support_features: Tensor, support_y: Tensor, n_way: int) -> TaskModulation:
        codes = self.encoder(support_features)  # [T, S, E]
        one_hot = F.one_hot(support_y, n_way).to(codes.dtype)  # [T, S, N]
        class_codes = one_hot.transpose(1, 2) @ codes / one_hot.sum(dim=1).unsqueeze(-1)
        num_tasks, _, width = class_codes.shape
        pairs = torch.cat(  # every ordered pair (i, j) of class codes: [T, N, N, 2E]
            [
                class_codes.unsqueeze(2).expand(num_tasks, n_way, n_way, width),
                class_codes.unsqueeze(1).expand(num_tasks, n_way, n_way, width),
            ],
            dim=-1,
        )
        task_code = self.relation(pairs).mean(dim=(1, 2))  # [T, E]
        dim = self.feature_dim
        scale_offset, shift, weight_logit, bias_logit = self.decoder(task_code).split(
            [dim, dim, dim, 1], dim=-1
        )
        # Multipliers in (0, 2), 1 at the zero start: a task can slow its head's steps
        # down or speed them up, but never make a step blow up.
        return TaskModulation(
            scale=1.0 + scale_offset,
            shift=shift,
            weight_lr_multiplier=2.0 * torch.sigmoid(weight_logit),
            bias_lr_multiplier=2.0 * torch.sigmoid(bias_logit),
        )


def modulated_logits(features: Tensor, head: ParameterDict, modulation: TaskModulation) -> Tensor:
    """Head logits on FiLM-modulated features of T tasks.

    features [T, B, D]; head ``head.weight`` [T, N, D], ``head.bias`` [T, N] -> [T, B, N].
    Equal to linear_per_task(features * scale + shift, weight, bias), computed with the
    modulation folded into the head (cheaper: N x D instead of B x D values).
    """
    weight, bias = head["head.weight"], head["head.bias"]
    folded_weight = weight * modulation.scale.unsqueeze(1)
    folded_bias = bias + torch.einsum("tnd,td->tn", weight, modulation.shift)
    return linear_per_task(features, folded_weight, folded_bias)


class AnilTaskEncoderLearner(MAMLLearner):
    """ANIL with a task encoder (module docstring). Meta-parameters: the model's and the
    task encoder's (``task_encoder.*``, always outer-trainable). Runs through the MAML
    core's meta-batch loop, task dropout, precision and optimizer groups."""

    algorithm = "anil_task_encoder"
    # Like the head, the task encoder is what a frozen-body setting still learns.
    own_outer_sections = ("task_encoder",)

    def __init__(
        self, model: nn.Module, n_way: int, options: Options, precision: Precision = "fp32"
    ) -> None:
        super().__init__(model, n_way, options, precision=precision)
        self.task_encoder = TaskEncoder(model.head.in_features, options.encoder_width)

    # -------------------------------------------------------------------- pieces
    def body_features(self, x: Tensor, dropout_masks: TaskDropoutMasks | None) -> Tensor:
        """Body features of T tasks, BatchNorm statistics per task: x [T, B, C, H, W] ->
        [T, B, D] in the model's dtype (the encoder and the head's inner steps run in full
        precision). ``dropout_masks[t]``: task t's per-block masks."""
        return body_features(
            self.model,
            x,
            dropout_masks,
            self.precision,
            self.vectorised,
            self.options.channels_last,
        )

    def adapt_head(
        self,
        head: ParameterDict,
        support_features: Tensor,
        support_y: Tensor,
        modulation: TaskModulation,
        steps: int,
        second_order: bool,
    ) -> list[ParameterDict]:
        """Inner loop on the head only: head stacked [T, ...], support_features [T, S, D],
        support_y [T, S]. Returns the trajectory [head_0, ..., head_steps]."""

        def support_loss(params: ParameterDict, step: int) -> Tensor:
            logits = modulated_logits(support_features, params, modulation)
            return per_task_cross_entropy(logits, support_y).sum()

        lrs = {
            "head.weight": self.options.inner_lr * modulation.weight_lr_multiplier.unsqueeze(1),
            "head.bias": self.options.inner_lr * modulation.bias_lr_multiplier,  # [T, 1]
        }
        return inner_loop(
            head, list(HEAD_NAMES), support_loss, lambda name, step: lrs[name], steps, second_order
        )

    # ------------------------------------------------------------ meta-training
    def run_tasks(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        dropout_masks: TaskDropoutMasks | None,
        second_order: bool,
        step_weights: Tensor,
    ) -> TaskOutcome:
        """Encoder, head inner loop and query losses of T tasks (the MAML core's hook).

        support_x [T, S, C, H, W], support_y [T, S], query_x [T, Q, C, H, W], query_y [T, Q].
        """
        support_features = self.body_features(support_x, dropout_masks)
        query_features = self.body_features(query_x, dropout_masks)
        modulation = self.task_encoder(support_features, support_y, self.n_way)
        head = stack_for_tasks(
            {name: self.model.get_parameter(name) for name in HEAD_NAMES}, support_x.shape[0]
        )
        trajectory = self.adapt_head(
            head, support_features, support_y, modulation, self.options.inner_steps, second_order
        )
        meta_losses, final_logits, final_losses = weighted_query_losses(
            trajectory,
            lambda head, step: modulated_logits(query_features, head, modulation),
            query_y,
            step_weights,
        )
        return TaskOutcome(meta_losses, final_logits, final_losses, None)

    # ------------------------------------------------------------------ testing
    def adapt_many(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """Adapt to T tasks: support_x [T, S, 1, H, W], support_y [T, S] in 0..N-1 (one N).

        ``steps`` (default ``test_inner_steps``) first-order head steps at each task's
        encoded rates, without task dropout, in `task_runner`'s chunks of tasks. For N other
        than the trained way count the head starts from zeros [N, D] (the encoder works for
        any N). Returns predictor(query_x [T, Q, 1, H, W]) -> logits [T, Q, N].
        """
        chunks, adapted = self._adapt_heads(support_x, support_y, steps)
        return lambda query_x: self._query_logits(query_x, chunks, adapted, (1,))[0]

    def adapt_before_after(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> BeforeAfterPredictor:
        """`adapt_many` with 0 and with ``steps`` head steps from one pass of the support and
        the query images through the body (which the inner loop does not change): predictor
        (query_x [T, Q, 1, H, W]) -> (logits before, logits after), each [T, Q, N]."""
        chunks, adapted = self._adapt_heads(support_x, support_y, steps)

        def predictor(query_x: Tensor) -> tuple[Tensor, Tensor]:
            before, after = self._query_logits(query_x, chunks, adapted, (0, 1))
            return before, after

        return predictor

    def _adapt_heads(
        self, support_x: Tensor, support_y: Tensor, steps: int | None
    ) -> tuple[list[slice], list[tuple[ParameterDict, ParameterDict, TaskModulation]]]:
        """`adapt_many`'s inner loop, chunk by chunk: per chunk the heads before and after
        ``steps`` steps (stacked [T_chunk, ...], detached) and the tasks' modulation."""
        steps = self.options.test_inner_steps if steps is None else steps
        dtype = self.model.head.weight.dtype
        n_way = int(support_y.max().item()) + 1
        if n_way == self.n_way:
            head = {name: self.model.get_parameter(name).detach() for name in HEAD_NAMES}
        else:
            head = zero_head(n_way, self.model.head.weight)
        head = {name: p.clone().requires_grad_(True) for name, p in head.items()}
        chunks = self.task_runner.chunks(support_x.shape[0])
        adapted = []
        for tasks in chunks:
            labels = support_y[tasks]
            with torch.no_grad():
                features = self.body_features(support_x[tasks].to(dtype), None)
                modulation = self.task_encoder(features, labels, n_way)
            with torch.enable_grad():
                trajectory = self.adapt_head(
                    stack_for_tasks(head, features.shape[0]),
                    features,
                    labels,
                    modulation,
                    steps,
                    second_order=False,
                )
            start, end = ({n: p.detach() for n, p in trajectory[i].items()} for i in (0, -1))
            adapted.append((start, end, modulation))
        return chunks, adapted

    def _query_logits(
        self,
        query_x: Tensor,
        chunks: list[slice],
        adapted: list[tuple[ParameterDict, ParameterDict, TaskModulation]],
        which: tuple[int, ...],
    ) -> list[Tensor]:
        """Logits [T, Q, N] of query_x [T, Q, 1, H, W] with the heads ``which`` (0: before
        adaptation, 1: after) of `_adapt_heads`, from one pass through the body."""
        check_query_tasks(query_x, chunks[-1].stop if chunks else 0)
        dtype = self.model.head.weight.dtype
        logits: list[list[Tensor]] = [[] for _ in which]
        with torch.no_grad():
            for tasks, (*heads, modulation) in zip(chunks, adapted, strict=True):
                features = self.body_features(query_x[tasks].to(dtype), None)
                for out, end in zip(logits, which, strict=True):
                    out.append(modulated_logits(features, heads[end], modulation))
        return [torch.cat(chunk_logits) for chunk_logits in logits]

    # --------------------------------------------------------------- optimizer
    def named_meta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The MAML core's meta-parameters plus ``task_encoder.*``."""
        return super().named_meta_parameters() + [
            (f"task_encoder.{name}", p) for name, p in self.task_encoder.named_parameters()
        ]


def build(options: Options, context: BuildContext) -> AnilTaskEncoderLearner:
    """An `AnilTaskEncoderLearner` on a fresh ``context.model`` network."""
    model = build_model(context.model, context.n_way, context.image_size)
    return AnilTaskEncoderLearner(model, context.n_way, options, precision=context.precision)
