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
  meta-batch's per-task query losses, so that the initial model does not serve some tasks
  much better than others: the Theil index (default), the generalised entropy index
  GE(alpha) or the Gini coefficient.
* ``encoder``: the seed project's "TAML" design, a different learner (see
  `metalab.algorithms.taml_encoder`): a task encoder over the support set modulates the
  features (FiLM) and sets per-task inner learning rates of the head, which the inner
  loop adapts ANIL-style.

Every MAML option works with ``entropy`` and ``inequality`` (first order, ANIL, Meta-SGD,
MAML++, Meta Dropout, ...), since they only change how task losses become the meta-loss;
``encoder`` always adapts the head only, with its generated rates (``inner_lr_mode:
fixed``), and supports first order, the multi-step loss and Meta Dropout. The options
schema is `metalab.algorithms.taml_options.Options`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalab.algorithms.base import BuildContext, StepStats, TrainProgress
from metalab.algorithms.maml import MAMLLearner
from metalab.algorithms.precision import Precision
from metalab.algorithms.taml_encoder import TAMLEncoderLearner
from metalab.algorithms.taml_options import Options
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

    The term couples the tasks of a meta-batch, so the MAML core keeps all tasks' graphs
    until one backward pass: `combine_task_losses` is overridden, hence
    ``combines_tasks_by_mean`` is False (a meta-batch cannot be split across processes).
    """

    algorithm = "taml"

    def __init__(
        self, model: nn.Module, n_way: int, options: Options, precision: Precision = "fp32"
    ) -> None:
        super().__init__(model, n_way, options, precision=precision)
        self.last_inequality = float("nan")  # for logging

    def combine_task_losses(
        self, query_losses: Tensor, pre_adaptation_logits: list[Tensor]
    ) -> Tensor:
        """Mean of the task losses [T] + inequality_weight x their inequality -> scalar."""
        inequality = inequality_measure(query_losses, self.options)
        self.last_inequality = float(inequality.detach())
        return query_losses.mean() + self.options.inequality_weight * inequality

    def meta_gradients(self, episodes: Episodes, progress: TrainProgress) -> StepStats:
        """MAML's meta-gradients of the TAML meta-loss; ``extra`` also logs the
        meta-batch's inequality (``inequality``)."""
        stats = super().meta_gradients(episodes, progress)
        stats.extra = {**(stats.extra or {}), "inequality": self.last_inequality}
        return stats


def build(options: Options, context: BuildContext) -> MAMLLearner:
    """A TAML learner of ``options.variant`` on a fresh ``context.model`` network."""
    model = build_model(context.model, context.n_way, context.image_size)
    learner_class = {
        "entropy": TAMLEntropyLearner,
        "inequality": TAMLInequalityLearner,
        "encoder": TAMLEncoderLearner,
    }[options.variant]
    return learner_class(model, context.n_way, options, precision=context.precision)
