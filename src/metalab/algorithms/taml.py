"""TAML, Task-Agnostic Meta-Learning (Jamal & Qi 2019), on the MAML core.

MAML's initial model can be biased towards the meta-training tasks it saw most, which
hurts on new tasks. TAML adds a task-agnostic term to the MAML meta-loss (the mean query
loss after adaptation); ``variant`` chooses it:

* ``entropy`` (entropy-maximisation TAML): lambda times the mean over tasks of minus the
  entropy of the *un-adapted* model's predicted class distribution on the task's query
  set, so the initial model is pushed towards unbiased, maximal-entropy predictions (ln N
  for uniform ones). The paper also *minimises* the entropy after adaptation (confident
  adapted predictions); that is ``adapted_entropy_weight`` (default 0 = off, the paper
  uses the same lambda for both terms).
* ``inequality`` (inequality-minimisation TAML): lambda times an inequality measure of the
  meta-batch's per-task losses of the *initial* (un-adapted) model, so that the initial
  model does not serve some tasks much better than others: the Theil index (default), the
  generalised entropy index GE(alpha) or the Gini coefficient (of the paper's measures,
  the Atkinson index and the variance of logarithms are not implemented).
  Which losses: the paper minimises "the inequality of initial losses" (abstract); in
  Sec. 3.2 the term is the inequality of the tasks' losses by the initial model f_theta,
  before the update, next to the expected loss after it, and Algorithm 2, line 10,
  updates theta along the gradient of E[L_Ti(f_theta_i)] + lambda I({L_Ti(f_theta)}).
  L_Ti(f_theta) is the loss the algorithm's inner step (lines 5-7) evaluates on the K
  samples drawn from T_i, the support set: ``inequality_losses: initial_support``
  (default). ``initial_query`` measures the initial model on the query set instead (what
  Sec. 3.2's text alone would also allow); ``adapted_query``, the adapted query losses,
  is not the paper's: it is this module's behaviour before 2026-12-03 (the committed
  ``taml_theil`` run).

The seed project's "TAML" design, once ``variant: encoder`` here, is not Jamal & Qi's
method: it is ANIL with a task encoder, algorithm ``anil_task_encoder``
(`metalab.algorithms.anil_task_encoder`).

Every MAML option works with both variants (first order, ANIL, Meta-SGD, MAML++, task
dropout, ...), since they only change how task losses become the meta-loss, except
``zero_head`` with a term on the initial model (uniform initial predictions make it a
constant; the options reject it). The options schema is
`metalab.algorithms.taml_options.Options`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalab.algorithms.base import BuildContext, StepStats, TrainProgress
from metalab.algorithms.functional import per_task_cross_entropy
from metalab.algorithms.maml import MAMLLearner
from metalab.algorithms.precision import Precision
from metalab.algorithms.taml_options import Options
from metalab.algorithms.task_forward import TaskDropoutMasks
from metalab.algorithms.task_runner import TaskOutcome
from metalab.data.episodes import Episodes
from metalab.models import build_model

# Task losses are cross-entropies (>= 0) and can reach 0 on an easy task; the inequality
# measures divide by and take logarithms of them, so they are floored at this value.
LOSS_FLOOR = 1e-8


# ------------------------------------------------------------------------ regularisers
def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of the predicted class distributions: logits [..., Q, N] -> [...].

    ln N for uniform predictions (the maximum), 0 for one-hot ones.
    """
    log_probabilities = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=-1)
    return entropy.mean(dim=-1)


def theil_index(losses: Tensor) -> Tensor:
    """Theil index T = (1/n) sum_i (l_i / mu) ln(l_i / mu) of losses [n] -> scalar.

    0 when all losses are equal, ln n at most (one task carries all the loss).
    """
    ratios = _ratios_to_mean(losses)
    return (ratios * ratios.log()).mean()


def generalized_entropy_index(losses: Tensor, alpha: float) -> Tensor:
    """Generalised entropy GE(alpha) of losses [n] -> scalar.

    GE(alpha) = 1 / (n alpha (alpha - 1)) sum_i ((l_i / mu)^alpha - 1); its limits are the
    mean log deviation -(1/n) sum_i ln(l_i / mu) at alpha = 0 and the Theil index at 1.
    GE(2) is half the squared coefficient of variation. 0 when all losses are equal.
    """
    ratios = _ratios_to_mean(losses)
    if alpha == 0.0:
        return -ratios.log().mean()
    if alpha == 1.0:
        return theil_index(losses)
    return (ratios.pow(alpha) - 1.0).mean() / (alpha * (alpha - 1.0))


def gini_coefficient(losses: Tensor) -> Tensor:
    """Gini coefficient G = sum_ij |l_i - l_j| / (2 n^2 mu) of losses [n] -> scalar.

    0 when all losses are equal, (n - 1) / n at most.
    """
    losses = losses.clamp_min(LOSS_FLOOR)
    differences = (losses.unsqueeze(0) - losses.unsqueeze(1)).abs()
    return differences.mean() / (2.0 * losses.mean())


def _ratios_to_mean(losses: Tensor) -> Tensor:
    """l_i / mu for losses [n], each floored at LOSS_FLOOR (logs and ratios stay finite)."""
    losses = losses.clamp_min(LOSS_FLOOR)
    return losses / losses.mean()


def inequality_measure(losses: Tensor, options: Options) -> Tensor:
    """The measure ``options.inequality`` of the per-task losses [T] -> scalar."""
    if options.inequality == "theil":
        return theil_index(losses)
    if options.inequality == "generalized_entropy":
        return generalized_entropy_index(losses, options.generalized_entropy_alpha)
    return gini_coefficient(losses)


# ----------------------------------------------------------------------------- learner
class TAMLEntropyLearner(MAMLLearner):
    """MAML with TAML's entropy terms (``variant: entropy``); adaptation, options and
    parameters are MAML's.

    Each task's meta-loss becomes l_t - lambda H(initial predictions) (+ the adapted
    entropy term). The terms are per task, so the MAML core's default mean over tasks is
    still the meta-loss and it backpropagates chunk by chunk, as for MAML: the un-adapted
    query logits never need to be kept for the whole meta-batch.
    """

    algorithm = "taml"
    needs_pre_adaptation_logits = True

    def __init__(
        self, model: nn.Module, n_way: int, options: Options, precision: Precision = "fp32"
    ) -> None:
        super().__init__(model, n_way, options, precision=precision)
        self.initial_entropies: list[Tensor] = []  # per chunk [T'], for logging

    def task_regularisers(self, pre_adaptation_logits: Tensor, adapted_logits: Tensor) -> Tensor:
        """TAML's entropy terms of T tasks from their query logits [T, Q, N] before and
        after adaptation -> [T]: -entropy_weight x H(before) + adapted_entropy_weight x
        H(after)."""
        terms = -self.options.entropy_weight * prediction_entropy(pre_adaptation_logits)
        if self.options.adapted_entropy_weight > 0:
            terms = terms + self.options.adapted_entropy_weight * prediction_entropy(adapted_logits)
        return terms

    def run_tasks(self, *args: Any, **kwargs: Any) -> TaskOutcome:
        """MAML's inner loop and query losses, each task's meta-loss [T] plus its terms."""
        outcome = super().run_tasks(*args, **kwargs)
        pre_adaptation_logits = outcome.pre_adaptation_logits  # [T, Q, N], in the graph
        outcome.meta_losses = outcome.meta_losses + self.task_regularisers(
            pre_adaptation_logits, outcome.final_query_logits
        )
        self.initial_entropies.append(prediction_entropy(pre_adaptation_logits.detach()))
        return outcome

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """MAML's meta-gradients of the TAML meta-loss; ``extra`` also logs the mean
        entropy of the initial model's query predictions (``initial_entropy``)."""
        self.initial_entropies = []
        stats = super().meta_gradients(episodes, progress)
        initial_entropy = float(torch.cat(self.initial_entropies).mean())
        stats.extra = {**(stats.extra or {}), "initial_entropy": initial_entropy}
        return stats


class TAMLInequalityLearner(MAMLLearner):
    """MAML with TAML's inequality term (``variant: inequality``); adaptation, options and
    parameters are MAML's.

    Meta-loss of a meta-batch of T tasks (Jamal & Qi 2019, Algorithm 2, line 10):

        (1/T) sum_t L_Q(theta_t) + lambda I(l_1, ..., l_T),

    theta_t task t's adapted weights, I the measure ``inequality`` and l_t task t's loss
    named by ``inequality_losses``: by default L_S(theta), the initial model's mean
    cross-entropy on task t's support set (one more support forward per task at theta_0,
    where the inner loop's first step is; `initial_losses`), else L_Q(theta) (the
    pre-adaptation query logits the MAML core computes) or L_Q(theta_t) itself. The
    initial losses depend on theta directly, so first-order MAML differentiates this term
    exactly. The term couples the tasks of a meta-batch, so the MAML core keeps all tasks'
    graphs until one backward pass: `combine_task_losses` is overridden, hence
    ``combines_tasks_by_mean`` is False (a meta-batch cannot be split across processes).
    """

    algorithm = "taml"

    def __init__(
        self, model: nn.Module, n_way: int, options: Options, precision: Precision = "fp32"
    ) -> None:
        super().__init__(model, n_way, options, precision=precision)
        # The MAML core computes the un-adapted query logits only when asked.
        self.needs_pre_adaptation_logits = options.inequality_losses == "initial_query"
        self.initial_losses: list[Tensor] = []  # per chunk [T'], in the graph, chunk order
        self.last_inequality = float("nan")  # for logging
        self.last_measured_loss = float("nan")

    def initial_support_losses(
        self,
        support_x: Tensor,
        support_y: Tensor,
        dropout_masks: TaskDropoutMasks | None,
    ) -> Tensor:
        """L_S(theta) of T tasks, the un-adapted model's mean cross-entropy on each support
        set (support_x [T, S, C, H, W], support_y [T, S]) -> [T], in the graph; the same
        forward as the inner loop's step 0 (task dropout masks, BatchNorm set 0), once
        differentiable."""
        forward = self._task_forward(support_x, None, dropout_masks, second_order=False)
        params = self._initial_params(support_x.shape[0] if forward.stacked else None)
        return per_task_cross_entropy(forward.logits(params, "support", 0), support_y)

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
        """MAML's inner loop and query losses of T tasks; records the tasks' initial losses
        [T] for `combine_task_losses` (the runner calls this chunk by chunk, in order, in
        the calling thread when the tasks are not combined by their mean). ``noise_seeds``:
        as `MAMLLearner.run_tasks` (``learned_noise``)."""
        outcome = super().run_tasks(
            support_x,
            support_y,
            query_x,
            query_y,
            dropout_masks,
            second_order,
            step_weights,
            noise_seeds=noise_seeds,
        )
        source = self.options.inequality_losses
        if source == "initial_support":
            self.initial_losses.append(
                self.initial_support_losses(support_x, support_y, dropout_masks)
            )
        elif source == "initial_query":
            logits = outcome.pre_adaptation_logits  # [T, Q, N], in the graph
            self.initial_losses.append(per_task_cross_entropy(logits, query_y))
        return outcome

    def meta_loss(self, adapted_losses: Tensor, measured_losses: Tensor) -> Tensor:
        """Mean of the adapted query losses [T] + inequality_weight x the inequality of
        ``measured_losses`` [T] (those ``inequality_losses`` names) -> scalar."""
        inequality = inequality_measure(measured_losses, self.options)
        self.last_inequality = float(inequality.detach())
        return adapted_losses.mean() + self.options.inequality_weight * inequality

    def combine_task_losses(
        self, query_losses: Tensor, pre_adaptation_logits: list[Tensor]
    ) -> Tensor:
        """`meta_loss` of the meta-batch's adapted query losses [T] and the losses recorded
        by `run_tasks` (the adapted query losses themselves for ``adapted_query``)."""
        if self.options.inequality_losses == "adapted_query":
            measured = query_losses
        else:
            measured = torch.cat(self.initial_losses)
        self.last_measured_loss = float(measured.detach().mean())
        return self.meta_loss(query_losses, measured)

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """MAML's meta-gradients of the TAML meta-loss; ``extra`` also logs the
        meta-batch's inequality (``inequality``) and the mean of the losses it measures
        (``measured_loss``)."""
        self.initial_losses = []
        try:
            stats = super().meta_gradients(episodes, progress)
        finally:
            self.initial_losses = []  # frees their graphs
        extra = {"inequality": self.last_inequality, "measured_loss": self.last_measured_loss}
        stats.extra = {**(stats.extra or {}), **extra}
        return stats


def build(options: Options, context: BuildContext) -> MAMLLearner:
    """A TAML learner of ``options.variant`` on a fresh ``context.model`` network."""
    model = build_model(context.model, context.n_way, context.image_size)
    learner_class = {
        "entropy": TAMLEntropyLearner,
        "inequality": TAMLInequalityLearner,
    }[options.variant]
    return learner_class(model, context.n_way, options, precision=context.precision)
