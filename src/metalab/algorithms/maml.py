"""The MAML family as one learner: MAML, first-order MAML, Meta-SGD, MAML++ and ANIL.

For each task (support set S, query set Q) the inner loop adapts the meta-parameters
theta by gradient descent on the support loss,

    theta_{k+1} = theta_k - alpha_k * grad_theta L_S(theta_k),      k = 0 .. K-1,

and the meta-loss is the query loss of the adapted weights, L_Q(theta_K), averaged over the
tasks of the meta-batch (or, with MAML++'s multi-step loss, sum_k w_k L_Q(theta_k)). The
variants are options of this one loop:

* MAML / first-order MAML: whether the inner gradient steps stay in the graph.
* ANIL (``adapt_parameters: head``): only ``head.*`` is adapted; the body's features are
  computed once per task and reused by every inner step.
* Meta-SGD (``inner_lr_mode: per_parameter``): alpha is a learned tensor per parameter;
  MAML++ LSLR (``per_layer_per_step``): one learned scalar per parameter tensor per step.
* MAML++: multi-step loss, per-step BatchNorm affine parameters, derivative-order annealing
  (each switchable on its own; the cosine meta-lr schedule belongs to the train loop).

BatchNorm is transductive, as in MAML's reference code: every forward normalises with the
statistics of the batch it sees (no running statistics), separately for each task and
separately for its support and its query set.

Two implementations of the same computation: a plain per-task loop over
``functional_call`` of the model (``vectorise_tasks: false``, the reference), and a
vectorised one that runs a chunk of tasks at once (grouped convolutions, see
`metalab.algorithms.functional`). Both give the same meta-gradients (tested).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from metalab.algorithms.base import (
    BuildContext,
    MetaLearner,
    StepStats,
    TrainProgress,
)
from metalab.algorithms.functional import (
    ParameterDict,
    batchnorm_parameter_names,
    conv4_grouped_features,
    inner_loop,
    linear_per_task,
    module_features,
    per_task_accuracy,
    per_task_cross_entropy,
    stack_for_tasks,
    use_batch_statistics,
)
from metalab.data.episodes import Episodes
from metalab.models import Conv4, build_model, draw_dropout_masks

# MAML++ keeps every non-final step's loss weight above this fraction of 1/K.
MULTI_STEP_MIN_WEIGHT_FRACTION = 0.03


class LrMultiplier(BaseModel):
    """One entry of ``outer_lr_multipliers``: parameters whose name matches ``pattern``."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="regular expression, re.search on the parameter name")
    multiplier: float = Field(ge=0, le=1000, description="outer lr = meta_lr x multiplier")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a regular expression: {pattern!r} ({error})") from error
        return pattern


class Options(BaseModel):
    """``experiments.<name>.options`` of algorithm ``maml``."""

    model_config = ConfigDict(extra="forbid")

    inner_lr: float = Field(0.4, gt=0, le=10, description="inner-loop step size (initial value)")
    inner_steps: int = Field(1, ge=1, le=50, description="inner gradient steps in training")
    test_inner_steps: int = Field(
        3, ge=0, le=200, description="adaptation steps at test time (adapt)"
    )
    first_order: bool = Field(False, description="first-order MAML: drop second derivatives")
    adapt_parameters: Literal["all", "head"] = Field(
        "all", description="what the inner loop adapts: everything (MAML) or head.* (ANIL)"
    )
    inner_lr_mode: Literal["fixed", "per_parameter", "per_layer_per_step"] = Field(
        "fixed",
        description=(
            "fixed lr; Meta-SGD learned lr tensors; MAML++ learned lr per tensor and step "
            "(test-time steps beyond inner_steps reuse the last step's)"
        ),
    )
    multi_step_loss: bool = Field(False, description="MAML++: query loss after every step")
    multi_step_loss_iterations: int = Field(
        1000, ge=1, description="MAML++: iterations over which step weights anneal to last step"
    )
    per_step_batchnorm: bool = Field(
        False,
        description=(
            "MAML++: separate BatchNorm weight/bias per inner step (not adapted; extra "
            "test-time steps reuse the last set)"
        ),
    )
    first_order_until_iteration: int = Field(
        0, ge=0, description="MAML++ derivative-order annealing: first-order before this"
    )
    outer_trainable: Literal["all", "head_and_batchnorm", "head"] = Field(
        "all", description="meta-parameters the outer optimizer updates"
    )
    outer_lr_multipliers: list[LrMultiplier] = Field(
        default_factory=list,
        description="per-parameter outer lr multipliers, first matching pattern wins",
    )
    body_warmup_iterations: int = Field(
        0, ge=0, description="body (incl. BatchNorm) outer lr is 0 before this iteration"
    )
    head_init: Literal["default", "zeros"] = Field(
        "default", description="head initialisation: PyTorch's Linear default or zeros"
    )
    meta_dropout_rates: list[float] | None = Field(
        None, description="Meta Dropout (Conv4): one rate per block, masks fixed per task"
    )
    vectorise_tasks: bool = Field(
        True, description="run a chunk of tasks in one pass (same result as a per-task loop)"
    )
    task_chunk_size: int = Field(
        2, ge=1, le=1024, description="tasks per vectorised pass (small = cache-friendly)"
    )
    channels_last: bool = Field(
        True, description="channels_last memory format for convolution inputs"
    )
    task_parallel: bool = Field(
        True,
        description=(
            "vectorised path with several torch threads: each thread runs whole task chunks "
            "single-threaded instead of all threads splitting every kernel"
        ),
    )

    @field_validator("meta_dropout_rates")
    @classmethod
    def _rates_in_range(cls, rates: list[float] | None) -> list[float] | None:
        if rates is not None and any(not 0.0 <= rate < 1.0 for rate in rates):
            raise ValueError("meta dropout rates must be in [0, 1)")
        return rates

    @model_validator(mode="after")
    def _consistent(self) -> Options:
        if self.per_step_batchnorm and self.adapt_parameters == "head":
            raise ValueError(
                "per_step_batchnorm needs adapt_parameters 'all': ANIL runs the body once"
            )
        return self


def multi_step_loss_weights(num_steps: int, iteration: int, anneal_iterations: int) -> Tensor:
    """MAML++ importance of the query loss after each inner step, float64 [num_steps].

    Starts uniform (1/K each); the non-final weights decay linearly to a floor of
    0.03/K over ``anneal_iterations`` while the final step takes the rest, so the weights
    always sum to 1. From ``anneal_iterations`` on, only the final step counts.
    """
    weights = torch.zeros(num_steps, dtype=torch.float64)
    if num_steps == 1 or iteration >= anneal_iterations:
        weights[-1] = 1.0
        return weights
    uniform = 1.0 / num_steps
    decay = uniform * (1.0 - iteration / anneal_iterations)
    weights[:-1] = max(decay, MULTI_STEP_MIN_WEIGHT_FRACTION * uniform)
    weights[-1] = 1.0 - weights[:-1].sum()
    return weights


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU advertises bf16 arithmetic (AVX512-BF16 or AMX); None if unknown.

    Without it, oneDNN emulates bf16 convolutions and bf16 autocast is slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (dots are not allowed there)."""
    return name.replace(".", "-")


@dataclass
class TaskOutcome:
    """What running the inner loop on a batch of T tasks produced.

    meta_losses [T]: each task's (possibly step-weighted) query loss, in the graph.
    final_query_logits [T, Q, N] and final_query_losses [T]: after the last inner step.
    pre_adaptation_logits [T, Q, N] or None: of the un-adapted model on the query set, in
    the graph (only with ``needs_pre_adaptation_logits``).
    """

    meta_losses: Tensor
    final_query_logits: Tensor
    final_query_losses: Tensor
    pre_adaptation_logits: Tensor | None


class MAMLLearner(MetaLearner):
    """MAML, first-order MAML, Meta-SGD, MAML++ and ANIL (see the module docstring).

    ``model`` must have ``body``/``head`` (Conv4 or ResNet18). Meta-parameters: the model's,
    plus learned inner lrs (``inner_lrs``) and per-step BatchNorm offsets (``step_offsets``).
    Subclasses may override `combine_task_losses` (TAML) and set
    ``needs_pre_adaptation_logits = True`` to receive the un-adapted query logits.
    """

    algorithm = "maml"
    adapts_by_gradient = True
    needs_pre_adaptation_logits: bool = False

    def __init__(
        self, model: nn.Module, n_way: int, options: Options, precision: str = "fp32"
    ) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and cpu_has_native_bf16() is False:
            warnings.warn(
                "precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16/AMX), "
                "so bf16 autocast is emulated and slower than fp32",
                stacklevel=2,
            )
        self.options = options
        self.n_way = n_way
        self.precision = precision
        use_batch_statistics(model)
        if options.head_init == "zeros":
            nn.init.zeros_(model.head.weight)
            nn.init.zeros_(model.head.bias)
        if options.meta_dropout_rates is not None:
            if not isinstance(model, Conv4):
                raise ValueError("meta_dropout_rates needs the conv4 model")
            if len(options.meta_dropout_rates) != len(model.block_output_shapes):
                raise ValueError(f"meta_dropout_rates needs {len(model.block_output_shapes)} rates")
        self.model = model
        self.batchnorm_names = batchnorm_parameter_names(model)
        model_names = [name for name, _ in model.named_parameters()]
        if options.adapt_parameters == "head":
            self.adapted_names = [name for name in model_names if name.startswith("head.")]
        elif options.per_step_batchnorm:
            # MAML++: BatchNorm parameters are per step, meta-learned, not adapted.
            self.adapted_names = [n for n in model_names if n not in self.batchnorm_names]
        else:
            self.adapted_names = model_names
        shapes = dict((name, p.shape) for name, p in model.named_parameters())

        self.inner_lrs: nn.ParameterDict | None = None
        if options.inner_lr_mode == "per_parameter":
            self.inner_lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.full(shapes[n], options.inner_lr))
                    for n in self.adapted_names
                }
            )
        elif options.inner_lr_mode == "per_layer_per_step":
            self.inner_lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.full((options.inner_steps,), options.inner_lr))
                    for n in self.adapted_names
                }
            )
        # Per-step BatchNorm: step k uses (weight + offset[k], bias + offset[k]); offsets
        # start at 0, so the shared part can be loaded from a pretrained body later.
        self.step_offsets: nn.ParameterDict | None = None
        if options.per_step_batchnorm:
            self.step_offsets = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.zeros(options.inner_steps + 1, *shapes[n]))
                    for n in self.batchnorm_names
                }
            )

    # ----------------------------------------------------------------- settings
    @property
    def default_adaptation_steps(self) -> int:
        return self.options.test_inner_steps

    @property
    def vectorised(self) -> bool:
        """Whether chunks of tasks run in one pass (ResNet18 + MAML falls back to a loop)."""
        return self.options.vectorise_tasks and (
            self.options.adapt_parameters == "head" or isinstance(self.model, Conv4)
        )

    def second_order_at(self, iteration: int) -> bool:
        """MAML++ derivative-order annealing: first-order before first_order_until_iteration."""
        return (not self.options.first_order) and (
            iteration >= self.options.first_order_until_iteration
        )

    def step_loss_weights(self, iteration: int) -> Tensor:
        """Weights of the query losses after steps 1..K, float64 [K] (one-hot last if off)."""
        if not self.options.multi_step_loss:
            return multi_step_loss_weights(self.options.inner_steps, 1, 0)
        return multi_step_loss_weights(
            self.options.inner_steps, iteration, self.options.multi_step_loss_iterations
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ------------------------------------------------------- meta-loss aggregation
    def combine_task_losses(
        self, query_losses: Tensor, pre_adaptation_logits: list[Tensor]
    ) -> Tensor:
        """The meta-loss of a meta-batch from its tasks' query losses [T] -> scalar.

        Default: the mean (MAML). Override to aggregate differently (TAML's task-agnostic
        terms); ``pre_adaptation_logits[t]`` are the un-adapted model's logits [Q, N] on task
        t's query set, in the autograd graph, and are only computed when the class sets
        ``needs_pre_adaptation_logits = True`` (otherwise the list is empty). When this
        method is overridden, all tasks' graphs are kept until one backward pass; with the
        default, each chunk of tasks is backpropagated as soon as it is done.
        """
        return query_losses.mean()

    def _combines_by_mean(self) -> bool:
        return type(self).combine_task_losses is MAMLLearner.combine_task_losses

    # --------------------------------------------------------- inner-loop pieces
    def _inner_lr(self, name: str, step: int) -> Tensor | float:
        mode = self.options.inner_lr_mode
        if mode == "fixed":
            return self.options.inner_lr
        lr = self.inner_lrs[_key(name)]
        if mode == "per_layer_per_step":
            return lr[min(step, self.options.inner_steps - 1)]  # extra test steps: last lr
        return lr

    def _with_step_batchnorm(self, params: ParameterDict, step: int) -> ParameterDict:
        """``params`` with BatchNorm weights/biases of inner step ``step`` (MAML++)."""
        if self.step_offsets is None:
            return params
        index = min(step, self.options.inner_steps)  # extra test-time steps: last set
        params = dict(params)
        for name in self.batchnorm_names:
            params[name] = params[name] + self.step_offsets[_key(name)][index]
        return params

    def _initial_params(self, num_tasks: int | None) -> ParameterDict:
        """theta_0: the model's parameters the inner loop needs, stacked for ``num_tasks``
        tasks (vectorised) or as they are (None)."""
        params = dict(self.model.named_parameters())
        if self.options.adapt_parameters == "head":
            params = {name: p for name, p in params.items() if name.startswith("head.")}
        return params if num_tasks is None else stack_for_tasks(params, num_tasks)

    def _task_forward(
        self,
        support_x: Tensor | None,
        query_x: Tensor | None,
        dropout_masks: list[list[Tensor | None]] | None,
        second_order: bool = False,
    ) -> _TaskForward:
        """How to compute logits of a batch of tasks (x [T, B, C, H, W])."""
        if self.options.adapt_parameters == "head":
            kind = _HeadOnlyForward
        elif self.vectorised:
            kind = _GroupedConv4Forward
        else:
            kind = _ModuleForward
        return kind(self, support_x, query_x, dropout_masks, second_order)

    def run_tasks(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        dropout_masks: list[list[Tensor | None]] | None,
        second_order: bool,
        step_weights: Tensor,
    ) -> TaskOutcome:
        """Inner loop + query losses of T tasks in one pass (T = 1 on the loop path).

        support_x [T, S, C, H, W], support_y [T, S], query_x [T, Q, C, H, W], query_y [T, Q];
        ``dropout_masks[t]``: task t's per-block masks, or None.
        """
        num_tasks = support_x.shape[0]
        forward = self._task_forward(support_x, query_x, dropout_masks, second_order)
        params = self._initial_params(num_tasks if forward.stacked else None)
        pre_adaptation_logits = None
        if self.needs_pre_adaptation_logits:
            pre_adaptation_logits = forward.logits(params, "query", 0)

        def support_loss(params: ParameterDict, step: int) -> Tensor:
            return per_task_cross_entropy(forward.logits(params, "support", step), support_y).sum()

        trajectory = inner_loop(
            params,
            self.adapted_names,
            support_loss,
            self._inner_lr,
            self.options.inner_steps,
            second_order,
        )
        # Query loss after step k, weighted (MAML++ multi-step loss; otherwise only k = K).
        weighted_losses = []
        for step, weight in enumerate(step_weights.tolist(), start=1):
            if weight == 0.0 and step < len(trajectory) - 1:
                continue
            logits = forward.logits(trajectory[step], "query", step)
            losses = per_task_cross_entropy(logits, query_y)
            weighted_losses.append(weight * losses)
        meta_losses = torch.stack(weighted_losses).sum(dim=0)
        return TaskOutcome(meta_losses, logits, losses, pre_adaptation_logits)

    # ------------------------------------------------------------- meta-training
    def _draw_dropout_masks(self, num_tasks: int, dtype: torch.dtype) -> list | None:
        """Per task, one mask per block, drawn once (global torch RNG) and fixed for all inner
        steps and the query pass of that task."""
        if self.options.meta_dropout_rates is None:
            return None
        shapes = self.model.block_output_shapes
        return [
            draw_dropout_masks(shapes, self.options.meta_dropout_rates, dtype=dtype)
            for _ in range(num_tasks)
        ]

    def _parameters_in_training(self, iteration: int) -> list[nn.Parameter]:
        """Meta-parameters with a nonzero outer lr at ``iteration`` (the backward's inputs)."""
        return [
            p
            for group in self.parameter_groups()
            if iteration >= group["warmup_iterations"]
            for p in group["params"]
        ]

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        dtype = self.model.head.weight.dtype
        support_x, query_x = episodes.support_x.to(dtype), episodes.query_x.to(dtype)
        support_y, query_y = episodes.support_y, episodes.query_y
        num_tasks = episodes.num_tasks
        second_order = self.second_order_at(progress.iteration)
        step_weights = self.step_loss_weights(progress.iteration)
        masks = self._draw_dropout_masks(num_tasks, dtype)
        inputs = self._parameters_in_training(progress.iteration)
        by_mean = self._combines_by_mean()
        chunk = self.options.task_chunk_size if self.vectorised else 1
        chunks = [slice(s, min(s + chunk, num_tasks)) for s in range(0, num_tasks, chunk)]

        def run(tasks: slice) -> TaskOutcome:
            return self.run_tasks(
                support_x[tasks],
                support_y[tasks],
                query_x[tasks],
                query_y[tasks],
                None if masks is None else masks[tasks],
                second_order,
                step_weights,
            )

        workers = self._task_workers(len(chunks)) if by_mean else 1
        if workers > 1:
            outcomes = self._run_chunks_in_threads(run, chunks, workers, inputs, num_tasks)
        else:
            outcomes = []
            for tasks in chunks:
                outcome = run(tasks)
                if by_mean:
                    # Mean over all tasks = sum of chunk sums / T: backpropagate chunk by chunk.
                    if inputs:
                        (outcome.meta_losses.sum() / num_tasks).backward(inputs=inputs)
                    outcome = _detached(outcome)
                outcomes.append(outcome)
        final_losses = torch.cat([o.final_query_losses.detach() for o in outcomes])
        accuracy = torch.cat(
            [
                per_task_accuracy(o.final_query_logits.detach(), query_y[tasks])
                for o, tasks in zip(outcomes, chunks, strict=True)
            ]
        ).mean()
        meta_losses = torch.cat([o.meta_losses for o in outcomes])
        if by_mean:
            meta_loss = meta_losses.mean()
        else:
            pre_logits = [
                logits
                for o in outcomes
                if o.pre_adaptation_logits is not None
                for logits in o.pre_adaptation_logits.unbind(0)
            ]
            meta_loss = self.combine_task_losses(meta_losses, pre_logits)
            if inputs:
                meta_loss.backward(inputs=inputs)
        return StepStats(
            loss=float(final_losses.mean()),
            accuracy=float(accuracy),
            extra={"meta_loss": float(meta_loss.detach()), "second_order": float(second_order)},
        )

    def _task_workers(self, num_chunks: int) -> int:
        """How many threads share the chunks of a meta-batch: torch's intra-op thread count
        (``task_parallel``, vectorised path only), at most one per chunk."""
        if not (self.options.task_parallel and self.vectorised):
            return 1
        return max(1, min(torch.get_num_threads(), num_chunks))

    def _run_chunks_in_threads(
        self,
        run: Callable[[slice], TaskOutcome],
        chunks: list[slice],
        workers: int,
        inputs: list[nn.Parameter],
        num_tasks: int,
    ) -> list[TaskOutcome]:
        """Task parallelism: each of ``workers`` threads runs a contiguous share of the
        chunks with single-threaded kernels and sums its chunks' meta-gradients in order.

        Per-task tensors are small, so two threads each running whole chunks beat two
        threads splitting every kernel (measured in benchmarks/throughput.py). Gradients
        are returned by `torch.autograd.grad` and added to ``.grad`` here in a fixed order,
        never accumulated concurrently, so a rerun gives bit-identical results.
        """
        shares = [
            chunks[w * len(chunks) // workers : (w + 1) * len(chunks) // workers]
            for w in range(workers)
        ]

        def run_share(share: list[slice]) -> tuple[list[TaskOutcome], list[Tensor | None]]:
            outcomes: list[TaskOutcome] = []
            total: list[Tensor | None] = [None] * len(inputs)
            for tasks in share:
                outcome = run(tasks)
                if inputs:
                    grads = torch.autograd.grad(
                        outcome.meta_losses.sum() / num_tasks, inputs, allow_unused=True
                    )
                    total = [_add(a, b) for a, b in zip(total, grads, strict=True)]
                outcomes.append(_detached(outcome))
            return outcomes, total

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # worker threads start with (and keep) one intra-op thread
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="metalab-tasks") as pool:
                results = list(pool.map(run_share, shares))
        finally:
            torch.set_num_threads(threads)
        outcomes = [outcome for share_outcomes, _ in results for outcome in share_outcomes]
        for index, parameter in enumerate(inputs):
            grad = None
            for _, totals in results:
                grad = _add(grad, totals[index])
            if grad is not None:
                parameter.grad = grad if parameter.grad is None else parameter.grad + grad
        return outcomes

    # ------------------------------------------------------------------ testing
    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> Callable[[Tensor], Tensor]:
        """Adapt to one task: support_x [S, 1, H, W], support_y [S] in 0..N-1.

        Runs ``steps`` (default ``test_inner_steps``) first-order gradient steps, without
        meta dropout. If N differs from the way count the model was built for, the head is
        replaced by a fresh zero-initialised N-way head (as MAML-style work does for unseen
        way counts), which the inner loop then adapts together with everything else it
        adapts; Meta-SGD's learned head lrs are then averaged over classes.
        Returns predictor(query_x [Q, 1, H, W]) -> logits [Q, N] (query batch statistics).
        """
        steps = self.options.test_inner_steps if steps is None else steps
        dtype = self.model.head.weight.dtype
        n_way = int(support_y.max().item()) + 1
        support_x, support_y = support_x.to(dtype).unsqueeze(0), support_y.unsqueeze(0)
        forward = self._task_forward(support_x, None, None)
        with torch.enable_grad():
            params = {
                name: p.detach().requires_grad_(name in self.adapted_names)
                for name, p in self._initial_params(None).items()
            }
            if n_way != self.n_way:
                params["head.weight"] = torch.zeros(
                    n_way, self.model.head.in_features, dtype=dtype, requires_grad=True
                )
                params["head.bias"] = torch.zeros(n_way, dtype=dtype, requires_grad=True)
            if forward.stacked:
                params = stack_for_tasks(params, 1)

            def support_loss(params: ParameterDict, step: int) -> Tensor:
                logits = forward.logits(params, "support", step)
                return per_task_cross_entropy(logits, support_y).sum()

            def inner_lr(name: str, step: int) -> Tensor | float:
                lr = self._inner_lr(name, step)
                if isinstance(lr, Tensor):
                    lr = lr.detach()
                    if lr.dim() > 0 and name.startswith("head.") and n_way != self.n_way:
                        lr = lr.mean(dim=0)  # class-averaged Meta-SGD lr for a fresh head
                return lr

            trajectory = inner_loop(
                params, self.adapted_names, support_loss, inner_lr, steps, False
            )
        adapted = {name: p.detach() for name, p in trajectory[-1].items()}

        def predictor(query_x: Tensor) -> Tensor:
            query_forward = self._task_forward(None, query_x.to(dtype).unsqueeze(0), None)
            with torch.no_grad():
                return query_forward.logits(adapted, "query", steps)[0]

        return predictor

    # --------------------------------------------------------------- optimizer
    def named_meta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every meta-parameter with a readable name (what ``outer_lr_multipliers`` match):
        model parameters (``body.*``, ``head.*``; BatchNorm weights stay meta-parameters with
        per-step BatchNorm), ``<name>.step_offsets`` and ``inner_lr.<name>``."""
        named = list(self.model.named_parameters())
        if self.step_offsets is not None:
            named += [
                (f"{n}.step_offsets", self.step_offsets[_key(n)]) for n in self.batchnorm_names
            ]
        if self.inner_lrs is not None:
            named += [(f"inner_lr.{n}", self.inner_lrs[_key(n)]) for n in self.adapted_names]
        return named

    def _section(self, name: str) -> str:
        if name.startswith("inner_lr."):
            return "inner_lr"
        if name.startswith("head."):
            return "head"
        if name.removesuffix(".step_offsets") in self.batchnorm_names:
            return "body_batchnorm"
        return "body"

    def _outer_trainable(self, section: str) -> bool:
        if self.options.outer_trainable == "all" or section in ("head", "inner_lr"):
            return True
        return self.options.outer_trainable == "head_and_batchnorm" and section == "body_batchnorm"

    def lr_multiplier(self, name: str) -> float:
        """Outer lr multiplier of meta-parameter ``name``: the first matching pattern's, else 1."""
        for entry in self.options.outer_lr_multipliers:
            if re.search(entry.pattern, name):
                return entry.multiplier
        return 1.0

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of the outer-trainable meta-parameters with a nonzero multiplier.

        One group per (section, multiplier, warmup); each carries ``name`` (e.g.
        ``"body x0.005 warmup 500"``), ``lr_multiplier``, ``warmup_iterations`` (the body's,
        BatchNorm included, is ``body_warmup_iterations``) and ``parameter_names``.
        Frozen parameters (not outer-trainable, or multiplier 0) are in no group.
        """
        groups: dict[tuple[str, float, int], dict[str, Any]] = {}
        for name, parameter in self.named_meta_parameters():
            section = self._section(name)
            multiplier = self.lr_multiplier(name)
            if not self._outer_trainable(section) or multiplier == 0.0:
                continue
            warmup = self.options.body_warmup_iterations if section.startswith("body") else 0
            group = groups.setdefault(
                (section, multiplier, warmup),
                {
                    "name": f"{section} x{multiplier:g}" + (f" warmup {warmup}" if warmup else ""),
                    "params": [],
                    "parameter_names": [],
                    "lr_multiplier": multiplier,
                    "warmup_iterations": warmup,
                },
            )
            group["params"].append(parameter)
            group["parameter_names"].append(name)
        return list(groups.values())


def _add(total: Tensor | None, value: Tensor | None) -> Tensor | None:
    """total + value, where None stands for zero."""
    if value is None:
        return total
    return value if total is None else total + value


def _detached(outcome: TaskOutcome) -> TaskOutcome:
    """The outcome's tensors without their autograd graphs (frees the chunk's graph)."""
    return TaskOutcome(
        outcome.meta_losses.detach(),
        outcome.final_query_logits.detach(),
        outcome.final_query_losses.detach(),
        None,
    )


# --------------------------------------------------------------------------- forwards
class _TaskForward:
    """Logits of T tasks for given parameters: ``logits(params, split, step)`` -> float32
    [T, B, N], ``split`` "support" or "query", ``step`` the number of updates so far (selects
    the per-step BatchNorm). ``stacked``: whether params carry a task dimension."""

    stacked: bool

    def __init__(
        self,
        learner: MAMLLearner,
        support_x: Tensor | None,
        query_x: Tensor | None,
        dropout_masks: list[list[Tensor | None]] | None,
        second_order: bool = False,
    ) -> None:
        self.learner = learner
        self.second_order = second_order
        self.model = learner.model
        self.dtype = learner.model.head.weight.dtype  # logits come back in this dtype
        self.inputs = {"support": support_x, "query": query_x}
        self.dropout_masks = dropout_masks
        if learner.options.channels_last:
            self.inputs = {
                split: None if x is None else _channels_last(x) for split, x in self.inputs.items()
            }

    def stacked_masks(self) -> list[Tensor | None] | None:
        """Per block, the tasks' masks stacked [T, C, H', W'] (None where a rate is 0)."""
        if self.dropout_masks is None:
            return None
        per_block = zip(*self.dropout_masks, strict=True)
        return [None if masks[0] is None else torch.cat(masks) for masks in per_block]

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        raise NotImplementedError


def _channels_last(x: Tensor) -> Tensor:
    """[T, B, C, H, W] with each image stored channels-last."""
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


class _ModuleForward(_TaskForward):
    """The plain reference: one task (T = 1) through the model via functional_call."""

    stacked = False

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        params = self.learner._with_step_batchnorm(params, step)
        x = self.inputs[split][0]
        masks = None if self.dropout_masks is None else self.dropout_masks[0]
        with self.learner._autocast():
            features = module_features(self.model, params, x, masks)
            logits = F.linear(features, params["head.weight"], params["head.bias"])
        return logits.to(self.dtype).unsqueeze(0)


class _GroupedConv4Forward(_TaskForward):
    """All T tasks of a chunk through Conv4 at once (grouped convolutions)."""

    stacked = True

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        params = self.learner._with_step_batchnorm(params, step)
        with self.learner._autocast():
            features = conv4_grouped_features(
                self.model,
                params,
                self.inputs[split],
                self.stacked_masks(),
                self.learner.options.channels_last,
                twice_differentiable=self.second_order and split == "support",
            )
            logits = linear_per_task(features, params["head.weight"], params["head.bias"])
        return logits.to(self.dtype)


class _HeadOnlyForward(_TaskForward):
    """ANIL: body features computed once per task and split, then only the head runs.

    Vectorised: all tasks' features in one grouped pass (Conv4) and a batched head; loop
    path: the model per task and one head."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stacked = self.learner.vectorised
        self.features: dict[str, Tensor] = {}

    def _features(self, split: str) -> Tensor:
        if split not in self.features:
            x = self.inputs[split]
            body = {n: p for n, p in self.model.named_parameters() if n.startswith("body.")}
            with self.learner._autocast():
                if self.stacked and isinstance(self.model, Conv4):
                    features = conv4_grouped_features(
                        self.model,
                        stack_for_tasks(body, x.shape[0]),
                        x,
                        self.stacked_masks(),
                        self.learner.options.channels_last,
                    )
                else:
                    masks = self.dropout_masks or [None] * x.shape[0]
                    features = torch.stack(
                        [
                            module_features(self.model, body, x[t], masks[t])
                            for t in range(x.shape[0])
                        ]
                    )
            # The head's few inner steps run in full precision on the cached features.
            self.features[split] = features.to(self.dtype)
        return self.features[split]

    def logits(self, params: ParameterDict, split: str, step: int) -> Tensor:
        features = self._features(split)
        if self.stacked:
            return linear_per_task(features, params["head.weight"], params["head.bias"])
        return F.linear(features, params["head.weight"], params["head.bias"])


def build(options: Options, context: BuildContext) -> MAMLLearner:
    """A MAML-family learner on a fresh ``context.model`` network for ``context.n_way`` ways."""
    model = build_model(context.model, context.n_way, context.image_size)
    return MAMLLearner(model, context.n_way, options, precision=context.precision)
