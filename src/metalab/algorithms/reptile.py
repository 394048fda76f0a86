"""Reptile (Nichol, Achiam & Schulman 2018): move the initialisation towards fine-tuned weights.

For each task the learner fine-tunes a copy of the weights ``theta`` for k steps of SGD or
Adam on the support set, giving ``adapted_t``; the outer update is

    theta <- theta + epsilon * mean_t(adapted_t - theta).

The train loop owns the optimizer, so `meta_gradients` writes that step as a gradient,
``grad = -epsilon * mean_t(adapted_t - theta)``: one step of plain SGD with learning rate
1 (no momentum, no weight decay, no lr schedule) is then exactly the Reptile step. The
learner advertises this through ``outer_optimizer = "sgd"`` and ``outer_lr = 1.0``.
Epsilon, and its optional linear annealing, is folded into the gradient.

The reference recipe (openai/supervised-reptile, Omniglot 1-shot: ``--train-shots 10
--inner-batch 10 --inner-iters 5``) trains on tasks with more shots than it tests with,
on inner mini-batches drawn without replacement from reshuffled passes over a task's
examples, with one inner Adam state (step count, moments) running on from task to task
(only the weights go back to the meta-weights); each test task fine-tunes from a copy of
it. Options ``train_shots``, ``inner_batch_size``, ``carry_inner_adam_state`` select this;
their defaults keep metalab's first Reptile. Deviations even then: training tasks also
sample queries (``train_query_per_class``), only for the logged accuracy; a test head for
another way count starts with zero Adam moments; and test tasks have
``episodes.query_per_class`` queries per class (the reference: 1), one transductive batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.func import functional_call, vmap

from metalab.algorithms.base import (
    BuildContext,
    MetaLearner,
    Predictor,
    StepStats,
    TaskBatchPredictor,
    TrainProgress,
    check_query_tasks,
)
from metalab.algorithms.functional import (
    StackedOptimizer,
    conv4_grouped_features,
    per_task_cross_entropy,
    zero_head,
)
from metalab.algorithms.precision import Precision, autocast, check_precision
from metalab.algorithms.reptile_adam import INNER_BETAS, CarriedAdam, CarriedAdamState
from metalab.algorithms.task_forward import to_channels_last
from metalab.data.episodes import Episodes
from metalab.models import Conv4, build_model

# Non-transductive evaluation classifies this many queries per vectorised forward pass
# (each one in a batch with the whole support set); bounds memory at 20-way 5-shot.
NON_TRANSDUCTIVE_CHUNK = 32
# Tasks per grouped pass of batched test-time fine-tuning (`ReptileLearner.fine_tune_many`).
TASKS_PER_PASS = 1


class Options(BaseModel):
    """``experiments.<name>.options`` for ``algorithm: reptile``."""

    model_config = ConfigDict(extra="forbid")

    inner_steps: int = Field(5, ge=1, le=10_000, description="fine-tuning steps per task (k)")
    test_inner_steps: int = Field(
        50, ge=0, le=100_000, description="fine-tuning steps at test time (paper: 50)"
    )
    inner_optimizer: Literal["sgd", "adam"] = Field(
        "adam",
        description="inner optimizer; Adam uses betas (0, 0.999), its state reset per task "
        "unless carry_inner_adam_state",
    )
    inner_lr: float = Field(0.001, gt=0.0, le=100.0, description="inner learning rate")
    inner_batch_size: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="support examples per meta-training inner step, drawn without "
        "replacement in reshuffled passes (reference: 10); null: the whole support set",
    )
    test_inner_batch_size: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="support examples per test-time step, drawn as inner_batch_size; null: "
        "the whole support set (not inner_batch_size: the test way and shot counts vary)",
    )
    train_shots: int | None = Field(
        None,
        ge=1,
        le=1_000,
        description="shots per class of meta-training tasks (reference: 10 for 1-shot "
        "Omniglot); null: train.k_shot. Validation and meta-test tasks keep train.k_shot",
    )
    train_query_per_class: int | None = Field(
        None,
        ge=1,
        le=1_000,
        description="queries per class of meta-training tasks, which only measure the logged "
        "adapted loss/accuracy (the Reptile step ignores them); null: train.query_per_class",
    )
    carry_inner_adam_state: bool = Field(
        False,
        description="true: one inner Adam state (step count, moments) runs on from task to "
        "task through meta-training, checkpointed with the weights, and each test-time "
        "fine-tuning starts from a copy of it (the reference); false: fresh per task",
    )
    epsilon: float = Field(1.0, gt=0.0, le=10.0, description="outer step size at the start")
    epsilon_final: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="anneal epsilon linearly to this value over training (paper: 0); "
        "null: constant epsilon",
    )
    transductive_eval: bool = Field(
        True,
        description="true: predict the query set in one batch (BatchNorm statistics of the "
        "queries); false: classify each query in a batch with the support set only",
    )
    head_init: Literal["zero", "random"] = Field(
        "zero",
        description="head for a way count other than the trained one: zeros, or PyTorch's "
        "default Linear initialisation (torch RNG)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Options:
        if self.carry_inner_adam_state and self.inner_optimizer != "adam":
            raise ValueError(
                "carry_inner_adam_state needs inner_optimizer 'adam' (SGD keeps no state)"
            )
        return self


def support_batches(
    num_support: int, batch_size: int | None, steps: int
) -> list[torch.Tensor | None]:
    """Index tensors [batch_size] into the support set, one per inner step.

    Passes over the support set are reshuffled with the global torch CPU RNG (the same
    batches on every device; a CPU index tensor indexes a tensor on any device) and
    concatenated, so a batch may straddle two passes. ``None`` entries mean "the whole
    support set" (when ``batch_size`` is None or not smaller than the support set; no RNG
    is drawn). No steps, no batches (and no RNG drawn).
    """
    if batch_size is None or batch_size >= num_support or steps == 0:
        return [None] * steps
    passes = math.ceil(steps * batch_size / num_support)
    order = torch.cat([torch.randperm(num_support, device="cpu") for _ in range(passes)])
    return list(order[: steps * batch_size].view(steps, batch_size))


class ReptileLearner(MetaLearner):
    """Reptile around any body/head network (``model(x [B,1,H,W]) -> logits [B, n_way]``).

    The meta-parameters are ``model``'s parameters. BatchNorm layers must normalise with
    batch statistics (as `Conv4` does), since the inner loop runs the shared module.
    """

    algorithm = "reptile"
    adapts_by_gradient = True
    # Contract with the train loop: the gradient already holds -epsilon * mean delta.
    outer_optimizer: ClassVar[Literal["adam", "sgd"] | None] = "sgd"
    outer_lr: ClassVar[float | None] = 1.0

    def __init__(self, model: nn.Module, options: Options, precision: Precision = "fp32") -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.precision = check_precision(precision)
        # The train loop samples meta-training tasks with these (None: train.k_shot and
        # train.query_per_class); validation and meta-test tasks keep train's.
        self.train_k_shot = options.train_shots
        self.train_query_per_class = options.train_query_per_class
        self.inner_adam: CarriedAdamState | None = None
        if options.carry_inner_adam_state:
            self.inner_adam = CarriedAdamState(dict(model.named_parameters()))

    @property
    def default_adaptation_steps(self) -> int:
        return self.options.test_inner_steps

    @property
    def test_batch_size(self) -> int | None:
        """Support examples per test-time step (None: the whole support set)."""
        return self.options.test_inner_batch_size

    @property
    def combines_tasks_by_mean(self) -> bool:
        """False with a carried inner Adam state: each task fine-tunes from the state the
        previous one left, so the meta-batch cannot be split across processes."""
        return self.inner_adam is None

    @property
    def batches_tasks(self) -> bool:  # type: ignore[override]
        """Whether `adapt_many` fine-tunes many tasks at once (`fine_tune_many`): a Conv4
        (the MAML family's grouped forward), every test step on the whole support set and a
        zero head for a new way count. Then test-time adaptation draws no random numbers
        (as the contract in `metalab.algorithms.base` asks); otherwise (test-time
        minibatches, random heads) tasks are adapted one by one, in the order of a
        per-episode loop."""
        return (
            isinstance(self.model, Conv4)
            and self.test_batch_size is None
            and self.options.head_init == "zero"
        )

    @property
    def trained_n_way(self) -> int:
        return self.model.head.out_features

    def epsilon_at(self, progress: TrainProgress) -> float:
        """Outer step size at ``progress``: linear from epsilon to epsilon_final."""
        start = self.options.epsilon
        if self.options.epsilon_final is None:
            return start
        return start + (self.options.epsilon_final - start) * progress.fraction

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group; step it with ``torch.optim.SGD(groups, lr=1.0)`` (see module doc)."""
        return [
            {
                "name": "all",
                "params": [p for p in self.parameters() if p.requires_grad],
                "lr_multiplier": 1.0,
            }
        ]

    def forward_with(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits [B, N] of ``model`` with ``params`` substituted; x [B, 1, H, W]."""
        with autocast(self.precision, x.device.type):
            logits = functional_call(self.model, params, (x,))
        return logits.float() if self.precision == "bf16" else logits

    def _fresh_head(self, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.model.head.weight
        if self.options.head_init == "zero":  # drawing no random numbers
            fresh = zero_head(n_way, weight)
            return fresh["head.weight"], fresh["head.bias"]
        # Initialised on the CPU (torch's global CPU RNG), then moved: the same head on
        # every device.
        head = nn.Linear(weight.shape[1], n_way, device="cpu")
        head = head.to(dtype=weight.dtype, device=weight.device)
        return head.weight.detach(), head.bias.detach()

    def _inner_optimizer(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        # A new optimizer per task: Adam's moments do not carry over from one task to the
        # next (unless carry_inner_adam_state, which steps with `CarriedAdam` instead).
        if self.options.inner_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.options.inner_lr, betas=INNER_BETAS)
        return torch.optim.SGD(params, lr=self.options.inner_lr)

    def fine_tune(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        batch_size: int | None,
        n_way: int | None = None,
        adam: CarriedAdam | None = None,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Fine-tune a copy of the weights on one task's support set.

        support_x float [S, 1, H, W], support_y int64 [S]. A way count ``n_way`` other than
        the trained one replaces the head by a fresh one (``head_init``). With a carried
        inner Adam state the steps continue ``adam`` (which keeps the state they reach), or
        by default a copy of the learner's state (left unchanged). Returns the adapted
        weights (detached, by parameter name) and the support loss of the last step (nan if
        ``steps`` is 0).
        """
        n_way = self.trained_n_way if n_way is None else n_way
        params = {
            name: p.detach().clone().requires_grad_(True)
            for name, p in self.model.named_parameters()
        }
        if n_way != self.trained_n_way:
            weight, bias = self._fresh_head(n_way)
            params["head.weight"] = weight.clone().requires_grad_(True)
            params["head.bias"] = bias.clone().requires_grad_(True)
        if adam is None and self.inner_adam is not None:
            adam = self.inner_adam.resume(params, self.options.inner_lr)
        optimizer = self._inner_optimizer(params.values()) if adam is None else None
        last_loss: torch.Tensor | None = None
        with torch.enable_grad():
            for indices in support_batches(support_x.shape[0], batch_size, steps):
                batch_x = support_x if indices is None else support_x[indices]
                batch_y = support_y if indices is None else support_y[indices]
                loss = F.cross_entropy(self.forward_with(params, batch_x), batch_y)
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                else:
                    grads = torch.autograd.grad(loss, list(params.values()))
                    adam.step(params, dict(zip(params, grads, strict=True)))
                last_loss = loss.detach()
        # Read once, after the loop: a read per step would wait for a GPU at every step.
        adapted = {name: p.detach() for name, p in params.items()}
        return adapted, math.nan if last_loss is None else last_loss.item()

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """Leave ``-epsilon_t * mean_t(adapted_t - theta)`` in ``.grad`` (accumulated).

        The reported loss/accuracy are those of the adapted weights on each task's query
        set (under no_grad, the query set predicted in one batch), averaged over tasks.
        """
        if episodes.n_way != self.trained_n_way:
            raise ValueError(
                f"Reptile was built for {self.trained_n_way}-way tasks, got {episodes.n_way}-way"
            )
        epsilon = self.epsilon_at(progress)
        theta = dict(self.model.named_parameters())
        delta_sum = {name: torch.zeros_like(p) for name, p in theta.items()}
        query_loss = query_correct = support_loss = 0.0
        num_tasks = episodes.num_tasks
        adam = None
        if self.inner_adam is not None:  # one state through the tasks in order, then kept
            adam = self.inner_adam.resume(theta, self.options.inner_lr)
        for t in range(num_tasks):
            adapted, last_support_loss = self.fine_tune(
                episodes.support_x[t],
                episodes.support_y[t],
                self.options.inner_steps,
                self.options.inner_batch_size,
                adam=adam,
            )
            for name, p in theta.items():
                delta_sum[name] += adapted[name] - p.detach()
            with torch.no_grad():
                logits = self.forward_with(adapted, episodes.query_x[t])
                query_loss += F.cross_entropy(logits, episodes.query_y[t]).item()
                query_correct += (logits.argmax(1) == episodes.query_y[t]).float().mean().item()
            support_loss += last_support_loss
        if adam is not None:
            self.inner_adam.store(adam)
        for name, p in theta.items():
            gradient = delta_sum[name] * (-epsilon / num_tasks)
            p.grad = gradient if p.grad is None else p.grad + gradient
        return StepStats(
            loss=query_loss / num_tasks,
            accuracy=query_correct / num_tasks,
            extra={"epsilon": epsilon, "support_loss": support_loss / num_tasks},
        )

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """Fine-tune for ``steps`` (default test_inner_steps) and return the predictor.

        support_x float [S, 1, H, W], support_y int64 [S]; predictor(query_x [Q, 1, H, W])
        -> logits [Q, N], transductive or not according to ``transductive_eval``.
        """
        steps = self.options.test_inner_steps if steps is None else steps
        n_way = int(support_y.max().item()) + 1
        adapted, _ = self.fine_tune(support_x, support_y, steps, self.test_batch_size, n_way)
        support_x = support_x.detach()

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if self.options.transductive_eval:
                    return self.forward_with(adapted, query_x)
                return self.predict_with_support(adapted, support_x, query_x)

        return predictor

    def adapt_many(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """`adapt` for T tasks: support_x [T, S, 1, H, W], support_y [T, S] (one N).

        When `batches_tasks`, all tasks are fine-tuned together (`fine_tune_many`) and their
        queries predicted through the same grouped forward; otherwise `adapt` task by task.
        Returns predictor(query_x [T, Q, 1, H, W]) -> logits [T, Q, N]."""
        if not self.batches_tasks:
            return super().adapt_many(support_x, support_y, steps)
        steps = self.options.test_inner_steps if steps is None else steps
        n_way = int(support_y.max().item()) + 1
        passes = list(range(0, support_x.shape[0], TASKS_PER_PASS))
        adapted = [
            self.fine_tune_many(
                support_x[p : p + TASKS_PER_PASS], support_y[p : p + TASKS_PER_PASS], steps, n_way
            )
            for p in passes
        ]
        support_x = support_x.detach()

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            check_query_tasks(query_x, support_x.shape[0])
            logits = []
            with torch.no_grad():
                for start, params in zip(passes, adapted, strict=True):
                    tasks = slice(start, start + TASKS_PER_PASS)
                    if self.options.transductive_eval:
                        dtype = params["head.weight"].dtype
                        query = to_channels_last(query_x[tasks].to(dtype))
                        logits.append(self.grouped_logits(params, query))
                        continue
                    for t, (x, q) in enumerate(zip(support_x[tasks], query_x[tasks], strict=True)):
                        task_params = {name: p[t] for name, p in params.items()}
                        logits.append(self.predict_with_support(task_params, x, q).unsqueeze(0))
            return torch.cat(logits)

        return predictor

    def grouped_logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits [T, B, N] of T tasks with stacked weights ``params[name]`` [T, *shape]:
        x [T, B, 1, H, W] channels-last through the MAML family's grouped Conv4 forward
        (BatchNorm statistics per task), then each task's head through ``F.linear``, the
        kernel `forward_with` runs. (At a zero head, e.g. for a new way count, the bias
        gradient is zero up to rounding, and Adam turns rounding into steps of up to lr:
        the same kernel rounds the same way as the per-episode path.)"""
        with autocast(self.precision, x.device.type):
            features = conv4_grouped_features(self.model, params, x, channels_last=True)
            logits = torch.stack(
                [
                    F.linear(task_features, weight, bias)
                    for task_features, weight, bias in zip(
                        features, params["head.weight"], params["head.bias"], strict=True
                    )
                ]
            )
        return logits.float() if self.precision == "bf16" else logits

    def fine_tune_many(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, n_way: int
    ) -> dict[str, torch.Tensor]:
        """`fine_tune` of T tasks at once on their whole support sets (support_x
        [T, S, 1, H, W], support_y [T, S]): stacked weights [T, *shape] through the grouped
        forward, each task its own inner optimizer state (`StackedOptimizer`, or a copy of
        the carried state for every task). A way count other than the trained one starts
        from a zero head. Returns the adapted weights by parameter name, stacked
        [T, *shape], detached."""
        num_tasks = support_x.shape[0]
        start = {name: p.detach() for name, p in self.model.named_parameters()}
        if n_way != self.trained_n_way:
            start["head.weight"], start["head.bias"] = self._fresh_head(n_way)
        params = {
            name: p.unsqueeze(0).expand(num_tasks, *p.shape).clone() for name, p in start.items()
        }
        options = self.options
        optimizer: StackedOptimizer | CarriedAdam
        if self.inner_adam is None:
            optimizer = StackedOptimizer(options.inner_optimizer, options.inner_lr, INNER_BETAS)
        else:
            optimizer = self.inner_adam.resume(params, options.inner_lr, tasks=num_tasks)
        support_x = to_channels_last(support_x.to(start["head.weight"].dtype))
        for _ in range(steps):
            with torch.enable_grad():
                leaves = {name: p.requires_grad_(True) for name, p in params.items()}
                logits = self.grouped_logits(leaves, support_x)
                # Summed over tasks: the gradient of row t is task t's own mean-loss gradient.
                loss = per_task_cross_entropy(logits, support_y).sum()
                grads = torch.autograd.grad(loss, list(leaves.values()))
            params = {name: p.detach() for name, p in leaves.items()}
            optimizer.step(params, dict(zip(params, grads, strict=True)))
        return params

    def predict_with_support(
        self, params: dict[str, torch.Tensor], support_x: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Non-transductive logits [Q, N]: each query is classified in a batch made of the
        support set [S, 1, H, W] plus that one query, so BatchNorm statistics never mix
        queries (the Reptile paper's non-transductive protocol)."""

        def last_logits(batch: torch.Tensor) -> torch.Tensor:
            return self.forward_with(params, batch)[-1]

        outputs = []
        for chunk in query_x.split(NON_TRANSDUCTIVE_CHUNK):
            support = support_x.unsqueeze(0).expand(chunk.shape[0], *support_x.shape)
            batches = torch.cat([support, chunk.unsqueeze(1)], dim=1)  # [C, S + 1, 1, H, W]
            outputs.append(vmap(last_logits)(batches))
        return torch.cat(outputs)


def build(options: Options, context: BuildContext) -> ReptileLearner:
    model = build_model(context.model, context.n_way, context.image_size)
    return ReptileLearner(model, options, precision=context.precision)
