"""CAVIA (Zintgraf et al. 2019): fast context adaptation.

The network weights are shared by all tasks and learned only in the outer loop; per task,
the inner loop adapts a small context vector (zeros at the start of every task) that
modulates one conv block through FiLM (`ContextConv4`):

    context_0 = 0,  context_{i+1} = context_i - inner_lr * d L_support(context_i) / d context_i

The meta-loss is the query loss under the final context, differentiated through the inner
updates (second order) unless ``first_order`` treats the final context as a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from metalab.algorithms.base import (
    BuildContext,
    MetaLearner,
    Predictor,
    StepStats,
    TrainProgress,
)
from metalab.algorithms.precision import Precision, autocast, check_precision
from metalab.data.episodes import Episodes
from metalab.models.context_conv4 import ContextConv4


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: cavia``."""

    model_config = ConfigDict(extra="forbid")

    num_context_params: int = Field(
        100, ge=1, le=10_000, description="size of the per-task context vector (paper: 100)"
    )
    film_block: int = Field(
        2, ge=0, le=3, description="0-based conv block the context modulates (reference code: 2)"
    )
    inner_lr: float = Field(1.0, gt=0.0, le=1000.0, description="context learning rate")
    inner_steps: int = Field(2, ge=1, le=100, description="context updates per task in training")
    test_inner_steps: int = Field(
        2, ge=0, le=1000, description="context updates per task at test time"
    )
    first_order: bool = Field(False, description="do not differentiate through the context updates")


class CAVIALearner(MetaLearner):
    """CAVIA around a `ContextConv4`; every ``nn.Parameter`` is a meta-parameter.

    The head has the trained way count; a task with fewer ways uses the first N logits
    (labels are arbitrary per task), more ways than trained is an error, because a
    context-only inner loop cannot create new output units.
    """

    algorithm = "cavia"
    adapts_by_gradient = True

    def __init__(
        self, model: ContextConv4, options: Options, precision: Precision = "fp32"
    ) -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.precision = check_precision(precision)

    @property
    def default_adaptation_steps(self) -> int:
        return self.options.test_inner_steps

    @property
    def trained_n_way(self) -> int:
        return self.model.head.out_features

    def logits(self, x: torch.Tensor, context: torch.Tensor, n_way: int) -> torch.Tensor:
        """x [B, 1, H, W], context [P] -> logits [B, n_way]."""
        if n_way > self.trained_n_way:
            raise ValueError(f"CAVIA was trained {self.trained_n_way}-way, got {n_way}-way")
        with autocast(self.precision, x.device.type):
            logits = self.model(x, context)[:, :n_way]
        return logits.float() if self.precision == "bf16" else logits

    def adapt_context(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        create_graph: bool,
    ) -> torch.Tensor:
        """Inner loop: ``steps`` gradient steps on the context from zeros; returns it [P].

        support_x float [S, 1, H, W], support_y int64 [S]. With ``create_graph`` the result
        stays differentiable with respect to the network weights (second-order CAVIA);
        otherwise it is detached.
        """
        n_way = int(support_y.max().item()) + 1
        context = self.model.initial_context().requires_grad_(True)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(self.logits(support_x, context, n_way), support_y)
                (gradient,) = torch.autograd.grad(loss, context, create_graph=create_graph)
                context = context - self.options.inner_lr * gradient
                if not create_graph:
                    context = context.detach().requires_grad_(True)
        return context if create_graph else context.detach()

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """Accumulate the gradient of the mean query loss (after context adaptation)."""
        num_tasks = episodes.num_tasks
        n_way = episodes.n_way
        query_loss = query_correct = context_norm = 0.0
        for t in range(num_tasks):
            context = self.adapt_context(
                episodes.support_x[t],
                episodes.support_y[t],
                self.options.inner_steps,
                create_graph=not self.options.first_order,
            )
            logits = self.logits(episodes.query_x[t], context, n_way)
            loss = F.cross_entropy(logits, episodes.query_y[t])
            # Backward per task keeps one task's graph alive at a time.
            (loss / num_tasks).backward()
            query_loss += loss.item()
            query_correct += (logits.argmax(1) == episodes.query_y[t]).float().mean().item()
            context_norm += context.detach().norm().item()
        return StepStats(
            loss=query_loss / num_tasks,
            accuracy=query_correct / num_tasks,
            extra={"context_norm": context_norm / num_tasks},
        )

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """Adapt the context for ``steps`` (default test_inner_steps); weights stay fixed.

        support_x float [S, 1, H, W], support_y int64 [S]; predictor(query_x [Q, 1, H, W])
        -> logits [Q, N] (query set in one batch, BatchNorm on its statistics).
        """
        steps = self.options.test_inner_steps if steps is None else steps
        n_way = int(support_y.max().item()) + 1
        context = self.adapt_context(support_x, support_y, steps, create_graph=False)

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.logits(query_x, context, n_way)

        return predictor


def build(options: Options, context: BuildContext) -> CAVIALearner:
    if context.model.name != "conv4":
        raise ValueError("CAVIA needs model.name: conv4 (it uses the FiLM-conditioned Conv4)")
    model = ContextConv4(
        context.n_way,
        context.image_size,
        hidden=context.model.hidden,
        downsample=context.model.downsample,
        num_context_params=options.num_context_params,
        film_block=options.film_block,
    )
    return CAVIALearner(model, options, precision=context.precision)
