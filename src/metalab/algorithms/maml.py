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
* The zeroing trick (``zero_head``; Kao, Chiu & Chen, ICLR 2022, "MAML is a Noisy
  Contrastive Learner in Classification"): every task's inner loop, in training and at
  test, starts from a zero linear head, so every class starts from the same logits and
  the pre-adaptation query loss is exactly ln N. The paper sets the head to zero after
  every outer update, which makes its outer update dead; here the head is simply left out
  of the outer optimizer (same trajectory of every other parameter).

BatchNorm is transductive, as in MAML's reference code: every forward normalises with the
statistics of the batch it sees (no running statistics), separately for each task and
separately for its support and its query set.

Around this core: `functional` (the inner loop as a function of a parameter dict),
`task_forward` (logits of a batch of tasks: the model task by task, the reference, or a
chunk of tasks at once with grouped convolutions; same meta-gradients, tested),
`task_runner` (a meta-batch in chunks, on threads), `outer_groups` (optimizer groups) and
`maml_adaptation` (test-time adaptation; before and after it from one inner loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalab.algorithms import learned_noise, maml_adaptation, outer_groups
from metalab.algorithms.base import (
    BeforeAfterPredictor,
    BuildContext,
    MetaLearner,
    StepStats,
    TaskBatchPredictor,
    TrainProgress,
)
from metalab.algorithms.functional import (
    ParameterDict,
    batchnorm_parameter_names,
    inner_loop,
    multi_step_loss_weights,
    per_task_cross_entropy,
    stack_for_tasks,
    use_batch_statistics,
    weighted_query_losses,
    zero_head,
)
from metalab.algorithms.maml_options import Options
from metalab.algorithms.precision import Precision, check_precision
from metalab.algorithms.task_forward import (
    GroupedConv4Forward,
    HeadOnlyForward,
    ModuleForward,
    TaskDropoutMasks,
    TaskForward,
    draw_task_dropout_masks,
)
from metalab.algorithms.task_runner import TaskOutcome, TaskRunner
from metalab.data.episodes import Episodes
from metalab.models import Conv4, build_model


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (dots are not allowed there)."""
    return name.replace(".", "-")


class MAMLLearner(MetaLearner):
    """MAML, first-order MAML, Meta-SGD, MAML++ and ANIL (see the module docstring).

    ``model`` must have ``body``/``head`` (Conv4 or ResNet18). Meta-parameters: the model's,
    plus learned inner lrs (``inner_lrs``) and per-step BatchNorm offsets (``step_offsets``).
    Subclasses may override `combine_task_losses` (TAML) and set
    ``needs_pre_adaptation_logits = True`` to receive the un-adapted query logits.
    """

    algorithm = "maml"
    adapts_by_gradient = True
    batches_tasks = True
    needs_pre_adaptation_logits: bool = False
    # Top-level modules of a subclass that form an outer-optimizer section of their own,
    # trained like the head (see `metalab.algorithms.outer_groups`).
    own_outer_sections: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, model: nn.Module, n_way: int, options: Options, precision: Precision = "fp32"
    ) -> None:
        super().__init__()
        self.options = options
        self.n_way = n_way
        self.precision = check_precision(precision)
        use_batch_statistics(model)
        if options.head_init == "zeros" or options.zero_head:
            # zero_head: the stored head is the zero start every task uses (model files,
            # a plain forward), though `_initial_params` never reads it.
            nn.init.zeros_(model.head.weight)
            nn.init.zeros_(model.head.bias)
        if options.task_dropout_rates is not None:
            if not isinstance(model, Conv4):
                raise ValueError("task_dropout_rates needs the conv4 model")
            if len(options.task_dropout_rates) != len(model.block_output_shapes):
                raise ValueError(f"task_dropout_rates needs {len(model.block_output_shapes)} rates")
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
        # Meta Dropout (Lee et al. 2020): phi, outer-only (`metalab.algorithms.learned_noise`).
        self.noise_generator = learned_noise.NoiseGenerator.build(model, options)

    # ----------------------------------------------------------------- settings
    @property
    def default_adaptation_steps(self) -> int:
        return self.options.test_inner_steps

    @property
    def combines_tasks_by_mean(self) -> bool:
        """True unless a subclass overrides `combine_task_losses` (e.g. TAML inequality)."""
        return type(self).combine_task_losses is MAMLLearner.combine_task_losses

    @property
    def vectorised(self) -> bool:
        """Whether chunks of tasks run in one pass (ResNet18 + MAML falls back to a loop)."""
        return self.options.vectorise_tasks and (
            self.options.adapt_parameters == "head" or isinstance(self.model, Conv4)
        )

    @property
    def task_runner(self) -> TaskRunner:
        """How meta-batches are split: chunks of ``task_chunk_size`` tasks, on several
        threads with ``task_parallel`` (vectorised path on the CPU only; the loop runs task
        by task)."""
        if not self.vectorised:
            return TaskRunner(chunk_size=1, task_parallel=False)
        return TaskRunner(self.options.task_chunk_size, self.options.task_parallel)

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
        """theta_0: the model's parameters the inner loop needs (``zero_head``: a fresh
        zero head [N, F], [N] instead of the model's), stacked for ``num_tasks`` tasks
        (vectorised) or as they are (None)."""
        params = dict(self.model.named_parameters())
        if self.options.adapt_parameters == "head":
            params = {name: p for name, p in params.items() if name.startswith("head.")}
        if self.options.zero_head:
            # The zeroing trick: fresh zeros (not the module's head, which no outer step
            # must reach), leaves that the inner loop differentiates.
            fresh = zero_head(self.n_way, self.model.head.weight)
            params.update({name: p.requires_grad_(True) for name, p in fresh.items()})
        return params if num_tasks is None else stack_for_tasks(params, num_tasks)

    def _task_forward(
        self,
        support_x: Tensor | None,
        query_x: Tensor | None,
        dropout_masks: TaskDropoutMasks | None,
        second_order: bool = False,
    ) -> TaskForward:
        """How to compute logits of a batch of tasks (x [T, B, C, H, W])."""
        inputs = (self.model, support_x, query_x, dropout_masks)
        precision, channels_last = self.precision, self.options.channels_last
        if self.options.adapt_parameters == "head":
            return HeadOnlyForward(*inputs, precision, channels_last, stacked=self.vectorised)
        kind = GroupedConv4Forward if self.vectorised else ModuleForward
        return kind(*inputs, precision, channels_last, second_order, self._with_step_batchnorm)

    def _adapt_on_support(
        self,
        forward: TaskForward,
        params: ParameterDict,
        support_y: Tensor,
        inner_lr: Callable[[str, int], Tensor | float],
        steps: int,
        second_order: bool,
        noise: learned_noise.SupportNoise | None = None,
    ) -> list[ParameterDict]:
        """The inner loop on T tasks' support sets (support_y [T, S]) from theta_0 =
        ``params``: the trajectory [theta_0, ..., theta_steps] of `functional.inner_loop`.
        ``noise``: the support losses are the learned-noise ones (the query's never are)."""

        def support_loss(params: ParameterDict, step: int) -> Tensor:
            if noise is not None:
                return noise.support_loss(forward, params, step, support_y)
            logits = forward.logits(params, "support", step)
            return per_task_cross_entropy(logits, support_y).sum()

        return inner_loop(params, self.adapted_names, support_loss, inner_lr, steps, second_order)

    def run_tasks(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        dropout_masks: TaskDropoutMasks | None,
        second_order: bool,
        step_weights: Tensor,
        noise_seeds: list[int] | None = None,
    ) -> TaskOutcome:
        """Inner loop + query losses of T tasks in one pass (T = 1 on the loop path).

        support_x [T, S, C, H, W], support_y [T, S], query_x [T, Q, C, H, W], query_y [T, Q];
        ``dropout_masks[t]``: task t's per-block masks, or None; ``noise_seeds[t]``: task t's
        learned-noise seed (``learned_noise``), or None.
        """
        num_tasks = support_x.shape[0]
        forward = self._task_forward(support_x, query_x, dropout_masks, second_order)
        params = self._initial_params(num_tasks if forward.stacked else None)
        pre_adaptation_logits = None
        if self.needs_pre_adaptation_logits:
            pre_adaptation_logits = forward.logits(params, "query", 0)

        samples = self.options.learned_noise_train_samples
        noise = learned_noise.support_noise(self.noise_generator, noise_seeds, samples)
        trajectory = self._adapt_on_support(
            forward,
            params,
            support_y,
            self._inner_lr,
            self.options.inner_steps,
            second_order,
            noise,
        )
        meta_losses, final_logits, final_losses = weighted_query_losses(
            trajectory,
            lambda params, step: forward.logits(params, "query", step),
            query_y,
            step_weights,
        )
        return TaskOutcome(meta_losses, final_logits, final_losses, pre_adaptation_logits)

    # ------------------------------------------------------------- meta-training
    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        dtype = self.model.head.weight.dtype
        support_x, query_x = episodes.support_x.to(dtype), episodes.query_x.to(dtype)
        support_y, query_y = episodes.support_y, episodes.query_y
        num_tasks = episodes.num_tasks
        second_order = self.second_order_at(progress.iteration)
        step_weights = self.step_loss_weights(progress.iteration)
        masks = draw_task_dropout_masks(
            self.model, self.options.task_dropout_rates, num_tasks, dtype, support_x.device
        )
        # Drawn here, in task order, so that chunking and threads do not change the noise.
        seeds = learned_noise.task_seeds(self.noise_generator, num_tasks)
        # The backward's inputs: meta-parameters with a nonzero outer lr at this iteration.
        inputs = outer_groups.trained_parameters(self.parameter_groups(), progress.iteration)
        by_mean = self.combines_tasks_by_mean

        def run(tasks: slice) -> TaskOutcome:
            return self.run_tasks(
                support_x[tasks],
                support_y[tasks],
                query_x[tasks],
                query_y[tasks],
                None if masks is None else masks[tasks],
                second_order,
                step_weights,
                **({} if seeds is None else {"noise_seeds": seeds[tasks]}),
            )

        # By the mean, each chunk is backpropagated as soon as it is done (mean over all
        # tasks = sum of chunk sums / T); otherwise one backward of the combined loss here.
        batch = self.task_runner.run(run, query_y, inputs, backward_per_chunk=by_mean)
        if by_mean:
            meta_loss = batch.meta_losses.mean()
        else:
            meta_loss = self.combine_task_losses(batch.meta_losses, batch.pre_adaptation_logits)
            if inputs:
                meta_loss.backward(inputs=inputs)
        return StepStats(
            loss=float(batch.final_query_losses.mean()),
            accuracy=float(batch.accuracies.mean()),
            extra={"meta_loss": float(meta_loss.detach()), "second_order": float(second_order)},
        )

    # ------------------------------------------------------------------ testing
    def adapt_many(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> TaskBatchPredictor:
        """Adapt to T tasks: support_x [T, S, 1, H, W], support_y [T, S] in 0..N-1 (one N).

        ``steps`` (default ``test_inner_steps``) first-order gradient steps per task, without
        task dropout, through the meta-training forward in `task_runner`'s chunks; a fresh
        zero head for N other than the trained way count (`maml_adaptation.adapt_chunks`).
        Returns predictor(query_x [T, Q, 1, H, W]) -> logits [T, Q, N] (query batch
        statistics, per task)."""
        return maml_adaptation.adapt_many(self, support_x, support_y, steps)

    def adapt_before_after(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> BeforeAfterPredictor:
        """`adapt_many` with 0 and with ``steps`` steps from one inner loop (ANIL: the query
        features computed once); predictor(query_x) -> (logits before, after) [T, Q, N]."""
        return maml_adaptation.adapt_before_after(self, support_x, support_y, steps)

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
        if self.noise_generator is not None:
            named += [(f"learned_noise.{n}", p) for n, p in self.noise_generator.named_parameters()]
        return named

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of the outer-trainable meta-parameters with a nonzero multiplier
        (`metalab.algorithms.outer_groups.parameter_groups`); with ``zero_head`` the head
        is in none (every inner loop starts from zeros, so it never reaches a loss)."""
        named = self.named_meta_parameters()
        if self.options.zero_head:
            named = [(n, p) for n, p in named if not n.startswith("head.")]
        # The noise generator is a section of its own, trained like the head.
        noise = ("learned_noise",) if self.noise_generator is not None else ()
        return outer_groups.parameter_groups(
            named,
            self.options,
            self.batchnorm_names,
            self.own_outer_sections + noise,
        )


def build(options: Options, context: BuildContext) -> MAMLLearner:
    """A MAML-family learner on a fresh ``context.model`` network for ``context.n_way`` ways."""
    model = build_model(context.model, context.n_way, context.image_size)
    return MAMLLearner(model, context.n_way, options, precision=context.precision)
