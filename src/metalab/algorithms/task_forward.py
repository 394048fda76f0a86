"""Logits of a batch of tasks as a function of (possibly per-task) parameters.

The MAML-family inner loop only needs ``logits(params, split, step)`` for the support and
the query set of T tasks; how they are computed is a strategy chosen once per batch:

* `ModuleForward`: the reference, one task through the ``nn.Module`` (``functional_call``);
* `GroupedConv4Forward`: all T tasks of a chunk through Conv4 at once (grouped
  convolutions, `metalab.algorithms.functional.conv4_grouped_features`);
* `HeadOnlyForward` (ANIL): body features computed once per task and split with the
  model's own body weights (`body_features`), then only the head runs.

Forwards run under the learner's precision (`metalab.algorithms.precision`) and return
logits in the head's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.functional import (
    ParameterDict,
    conv4_grouped_features,
    linear_per_task,
    module_features,
    stack_for_tasks,
)
from metalab.algorithms.precision import Precision, autocast
from metalab.models import Conv4, draw_dropout_masks

# Per task, one task dropout mask per block ([1, C, H', W'], or None where a rate is 0).
TaskDropoutMasks = list[list[Tensor | None]]


def to_channels_last(x: Tensor) -> Tensor:
    """[T, B, C, H, W] with each image stored channels-last."""
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


def stack_dropout_masks(dropout_masks: TaskDropoutMasks | None) -> list[Tensor | None] | None:
    """Per block, the T tasks' masks stacked [T, C, H', W'] (None where a rate is 0)."""
    if dropout_masks is None:
        return None
    per_block = zip(*dropout_masks, strict=True)
    return [None if masks[0] is None else torch.cat(masks) for masks in per_block]


def draw_task_dropout_masks(
    model: nn.Module,
    rates: list[float] | None,
    num_tasks: int,
    dtype: torch.dtype,
    device: torch.device,
) -> TaskDropoutMasks | None:
    """Task dropout: per task, one mask per block of ``model`` (a Conv4), drawn once from
    the global torch CPU RNG (task by task, the same numbers on every device), moved to
    ``device`` and fixed for all inner steps and the query pass of that task. None without
    ``rates``."""
    if rates is None:
        return None
    shapes = model.block_output_shapes
    return [draw_dropout_masks(shapes, rates, dtype=dtype, device=device) for _ in range(num_tasks)]


def body_features(
    model: nn.Module,
    x: Tensor,
    dropout_masks: TaskDropoutMasks | None,
    precision: Precision,
    grouped: bool,
    channels_last: bool,
    channels_last_weights: bool = False,
) -> Tensor:
    """Body features of T tasks with the model's own body weights, BatchNorm statistics
    per task: x [T, B, C, H, W] -> [T, B, D] in the body's dtype (the head's, where there
    is one).

    ``grouped``: all tasks in one grouped pass (Conv4 only; otherwise the model runs task
    by task). ``dropout_masks[t]``: task t's per-block masks. ``channels_last_weights``
    (the task-by-task path): the body's convolution weights copied channels-last for this
    call, which is what makes PyTorch run the convolutions channels-last when the images
    have one channel (ResNet18 at 28x28, one thread: 1.8x); the same function up to float
    rounding.
    """
    body = {n: p for n, p in model.named_parameters() if n.startswith("body.")}
    num_tasks = x.shape[0]
    with autocast(precision, x.device.type):
        if grouped and isinstance(model, Conv4):
            features = conv4_grouped_features(
                model,
                stack_for_tasks(body, num_tasks),
                x,
                stack_dropout_masks(dropout_masks),
                channels_last,
            )
        else:
            masks = dropout_masks or [None] * num_tasks
            weights = body
            if channels_last_weights:
                weights = {
                    n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p
                    for n, p in body.items()
                }
            features = torch.stack(
                [module_features(model, weights, x[t], masks[t]) for t in range(num_tasks)]
            )
    # What consumes the cached features (a head's inner steps, an encoder) runs in full
    # precision.
    return features.to(next(iter(body.values())).dtype)


def _same_parameters(params: ParameterDict, step: int) -> ParameterDict:
    return params


class TaskForward:
    """Logits of T tasks for given parameters: ``logits(params, split, step)`` -> [T, B, N]
    in the head's dtype, ``split`` "support" or "query", ``step`` the number of updates so
    far. ``stacked``: whether params carry a task dimension [T, *shape].

    support_x, query_x [T, B, C, H, W] (either may be None when unused);
    ``step_parameters(params, step)`` gives the parameters the forward of inner step
    ``step`` uses (MAML++ per-step BatchNorm); ``second_order``: support logits will be
    differentiated twice.
    """

    stacked: bool

    def __init__(
        self,
        model: nn.Module,
        support_x: Tensor | None,
        query_x: Tensor | None,
        dropout_masks: TaskDropoutMasks | None,
        precision: Precision,
        channels_last: bool,
        second_order: bool = False,
        step_parameters: Callable[[ParameterDict, int], ParameterDict] = _same_parameters,
    ) -> None:
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.second_order = second_order
        self.step_parameters = step_parameters
        self.dtype = model.head.weight.dtype  # logits come back in this dtype
        self.inputs = {"support": support_x, "query": query_x}
        self.dropout_masks = dropout_masks
        if channels_last:
            self.inputs = {
                split: None if x is None else to_channels_last(x)
                for split, x in self.inputs.items()
            }

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        raise NotImplementedError

    def precompute(self, split: str) -> None:
        """Compute now, and keep, what ``split``'s logits need that does not depend on
        ``params`` (nothing here; ANIL: the body features), e.g. under ``torch.no_grad``
        when nothing will be differentiated through it."""


class ModuleForward(TaskForward):
    """The plain reference: one task (T = 1) through the model via functional_call."""

    stacked = False

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        params = self.step_parameters(params, step)
        x = self.inputs[split][0]
        masks = None if self.dropout_masks is None else self.dropout_masks[0]
        with autocast(self.precision, x.device.type):
            features = module_features(self.model, params, x, masks)
            logits = F.linear(features, params["head.weight"], params["head.bias"])
        return logits.to(self.dtype).unsqueeze(0)


class GroupedConv4Forward(TaskForward):
    """All T tasks of a chunk through Conv4 at once (grouped convolutions)."""

    stacked = True

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        params = self.step_parameters(params, step)
        x = self.inputs[split]
        with autocast(self.precision, x.device.type):
            features = conv4_grouped_features(
                self.model,
                params,
                x,
                stack_dropout_masks(self.dropout_masks),
                self.channels_last,
                twice_differentiable=self.second_order and split == "support",
            )
            logits = linear_per_task(features, params["head.weight"], params["head.bias"])
        return logits.to(self.dtype)


class HeadOnlyForward(TaskForward):
    """ANIL: body features computed once per task and split, then only the head runs.

    ``stacked`` (vectorised): all tasks' features in one grouped pass (Conv4) and a
    batched head; otherwise the model per task and one head. The head's parameters are
    the only entries of ``params`` read."""

    def __init__(self, *args: Any, stacked: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stacked = stacked
        self.features: dict[str, Tensor] = {}
        # Test-time adaptation sets it (`metalab.algorithms.maml_adaptation`): body weights
        # channels-last (`body_features`); training leaves its numbers as they were.
        self.channels_last_weights = False

    def precompute(self, split: str) -> None:
        self._features(split)

    def _features(self, split: str) -> Tensor:
        if split not in self.features:
            self.features[split] = body_features(
                self.model,
                self.inputs[split],
                self.dropout_masks,
                self.precision,
                self.stacked,
                self.channels_last,
                self.channels_last_weights and self.channels_last,
            )
        return self.features[split]

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        features = self._features(split)
        if self.stacked:
            return linear_per_task(features, params["head.weight"], params["head.bias"])
        return F.linear(features, params["head.weight"], params["head.bias"])
