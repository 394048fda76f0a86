"""MAML-RL, ANIL-RL, Reptile-RL and the joint policy-gradient reference over a shared
inner loop.

One meta-iteration of every learner:
1. sample T tasks; for each, sample trajectories with the meta-policy, take inner
   policy-gradient steps (fresh trajectories before each step), sample post-adaptation
   trajectories; everything lands in a :class:`MetaBuffer` (no graph kept);
2. update the meta-parameters from the buffer.

MAML-RL replays the inner steps differentiably from the buffer (second-order, or
first-order with the inner gradients held constant) and minimises the policy-gradient
loss of the adapted policies on their post-adaptation trajectories with a plain Adam/SGD
step on the meta-parameters (no TRPO). The objective is the expected post-adaptation
return J(theta) = E_{tau ~ pi_theta}[ E_{tau' ~ pi_theta'(tau)}[R(tau')] ] with
theta'(tau) = theta + alpha * g(tau, theta) the inner step on the pre-adaptation
trajectories tau. Its gradient has two parts: (a) the post-adaptation policy gradient
pulled back through the inner step, (d theta'/d theta)^T grad_theta' J_post, and (b) the
dependence of the pre-adaptation sampling distribution on theta,
E_tau[grad_theta log p(tau; theta) * J_post(theta'(tau))]. ``inner_estimator`` picks:

- ``reinforce`` (the MAML paper's code, pytorch-maml-rl): (a) only, d theta'/d theta
  from differentiating the REINFORCE surrogate twice (sum of grad^2 log pi * A). Term
  (b) is missing, so as an estimate of grad J it is biased (equivalently: its Hessian of
  the pre-adaptation return lacks the E[grad log pi grad log pi^T A] part).
- ``lvc`` (ProMP's low-variance curvature): (a) with the inner loss
  pi / stop_grad(pi) * A, whose second derivative adds each step's score outer product,
  a low-variance stand-in for (b) to first order in the inner step size; still biased
  (cross-step terms dropped, and (b) only approximated).
- ``dice``: the DiCE objective of the whole two-level sampling process: (a) plus the
  magic-box of the cumulative log-probability of every pre-adaptation trajectory times
  the adapted task's post-adaptation return (less a leave-one-task-out baseline, as in
  Loaded DiCE, which keeps it unbiased). Its expectation is exactly grad J (checked by
  enumeration in ``tests/test_rl_estimators.py``). The inner step itself stays plain
  REINFORCE: putting the magic box inside the inner loss as well would count (b) twice.

First-order MAML-RL holds the inner gradients constant in every variant. ANIL-RL is the
same with only the head (mean layer + log-std, or logits) adapted in the inner loop; the
outer step still trains body and head (and ``dice``'s term (b) reaches the body too).
Reptile-RL moves the meta-parameters toward the mean adapted parameters:
theta += epsilon_k * (mean_i theta_i' - theta), epsilon_k going linearly from
``epsilon`` at the first iteration toward ``epsilon_final`` (see :meth:`ReptileRL.epsilon_at`).

:class:`JointPolicyGradient` is the MAML paper's "pretrained" reference: one policy
trained by plain policy gradient on the mixture of training tasks (every iteration:
trajectories of the meta-batch's tasks under the current policy, one Adam step on their
REINFORCE loss; nothing adapts in training). Evaluated like the learners, it shows what
adaptation from an ordinary multi-task policy gives.

A learner computes on its policy's device (environment and baseline on the same one);
``tasks_per_second`` waits for the device's queued work before reading the clock.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from metalab.device import synchronize
from metalab.rl.adaptation import (
    INNER_ESTIMATORS,
    InnerEstimator,
    inner_update,
    magic_box,
    policy_gradient_losses,
    sample_adaptation,
    trajectory_log_probs,
)
from metalab.rl.baselines import Baseline
from metalab.rl.buffer import MetaBuffer
from metalab.rl.envs import MetaRLEnvironment
from metalab.rl.policies import head_parameter_names, stack_parameters

METRIC_NAMES = (
    "policy_loss",
    "critic_loss",
    "total_loss",
    "pre_adaptation_return",
    "post_adaptation_return",
    "tasks_per_second",
)


class NonFiniteLossError(FloatingPointError):
    """A meta-iteration produced a NaN or infinite loss; raised before any weight changes."""

    def __init__(self, iteration: int, losses: dict[str, float]) -> None:
        bad = ", ".join(f"{name}={value}" for name, value in losses.items())
        super().__init__(f"non-finite loss at iteration {iteration}: {bad}")
        self.iteration = iteration


def _check_finite(iteration: int, losses: dict[str, float]) -> None:
    if not all(math.isfinite(value) for value in losses.values()):
        raise NonFiniteLossError(iteration, losses)


def _elapsed(started: float, device: torch.device) -> float:
    """Seconds since ``started`` once ``device`` has finished its queued work (CUDA kernels
    run asynchronously: without the wait the clock would miss them)."""
    synchronize(device)
    return time.perf_counter() - started


class RLMetaLearner:
    """Common machinery: environment, policy, baseline, inner-loop settings."""

    algorithm = "base"

    def __init__(
        self,
        env: MetaRLEnvironment,
        policy: nn.Module,
        baseline: Baseline,
        trajectories_per_task: int,
        inner_lr: float,
        inner_steps: int,
        gamma: float,
        gae_lambda: float,
    ) -> None:
        self.env = env
        self.policy = policy
        self.baseline = baseline
        self.trajectories_per_task = trajectories_per_task
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.gamma = gamma
        self.gae_lambda = gae_lambda

    @property
    def device(self) -> torch.device:
        """Where the learner computes: its policy's device."""
        return next(self.policy.parameters()).device

    def adapted_parameter_names(self) -> list[str]:
        """Names the inner loop changes (all of them unless overridden)."""
        return [name for name, _ in self.policy.named_parameters()]

    def collect(
        self, tasks: torch.Tensor, generator: torch.Generator
    ) -> tuple[MetaBuffer, dict[str, torch.Tensor], float]:
        """Fill a meta-buffer for ``tasks`` [T, task_dim] (see ``sample_adaptation``)."""
        return sample_adaptation(
            self.env,
            self.policy,
            tasks,
            self.trajectories_per_task,
            self.inner_steps,
            self.inner_lr,
            self.adapted_parameter_names(),
            self.baseline,
            self.gamma,
            self.gae_lambda,
            generator,
            track_meta_gradient=True,
        )

    def meta_step(
        self, tasks: torch.Tensor, generator: torch.Generator, iteration: int
    ) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns the iteration's metrics."""
        raise NotImplementedError

    def optimizer_state(self) -> dict | None:
        return None

    def load_optimizer_state(self, state: dict | None) -> None:
        """Nothing to restore unless the learner has an outer optimizer."""

    @staticmethod
    def _metrics(
        buffer: MetaBuffer, policy_loss: float, critic_loss: float, seconds: float
    ) -> dict[str, float]:
        return {
            "policy_loss": policy_loss,
            "critic_loss": critic_loss,
            "total_loss": policy_loss + critic_loss,
            "pre_adaptation_return": buffer.pre_adaptation_return(),
            "post_adaptation_return": buffer.post_adaptation_return(),
            "tasks_per_second": buffer.num_tasks / max(seconds, 1e-9),
        }


def build_optimizer(policy: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """The outer optimizer ``name`` ("adam" or "sgd") over the policy's parameters."""
    if name == "adam":
        return torch.optim.Adam(policy.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(policy.parameters(), lr=lr)
    raise ValueError(f"unknown outer optimizer {name!r}")


class MAMLRL(RLMetaLearner):
    """MAML for RL: differentiate the post-adaptation policy gradient through the inner loop."""

    algorithm = "maml_rl"

    def __init__(
        self,
        env: MetaRLEnvironment,
        policy: nn.Module,
        baseline: Baseline,
        trajectories_per_task: int,
        inner_lr: float,
        inner_steps: int,
        gamma: float,
        gae_lambda: float,
        first_order: bool,
        outer_lr: float,
        outer_optimizer: str = "adam",
        inner_estimator: InnerEstimator = "reinforce",
    ) -> None:
        super().__init__(
            env, policy, baseline, trajectories_per_task, inner_lr, inner_steps, gamma, gae_lambda
        )
        self.first_order = first_order
        if inner_estimator not in INNER_ESTIMATORS:
            raise ValueError(f"unknown inner estimator {inner_estimator!r}")
        self.inner_estimator: InnerEstimator = inner_estimator
        self.optimizer = build_optimizer(policy, outer_optimizer, outer_lr)

    def adapt_from_buffer(
        self, buffer: MetaBuffer, create_graph: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Replay the buffer's inner steps from the meta-parameters, keeping the graph.

        Returns per-task adapted parameters [T, ...] that depend differentiably on the
        meta-parameters (through the inner gradients too unless first-order).
        """
        return self._replay(buffer, create_graph, with_log_probs=False)[0]

    def _replay(
        self, buffer: MetaBuffer, create_graph: bool | None, with_log_probs: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Adapted parameters and, if asked, each task's summed log-probability [T] of all
        its pre-adaptation trajectories under the parameters that sampled them."""
        if create_graph is None:
            create_graph = not self.first_order
        parameters = stack_parameters(dict(self.policy.named_parameters()), buffer.num_tasks)
        log_probs: torch.Tensor | None = None
        for batch in buffer.pre_adaptation:
            if with_log_probs:
                step = trajectory_log_probs(self.policy, parameters, batch.trajectories)
                step = step.sum(dim=(1, 2))
                log_probs = step if log_probs is None else log_probs + step
            parameters = inner_update(
                self.policy,
                parameters,
                batch,
                self.inner_lr,
                self.adapted_parameter_names(),
                create_graph=create_graph,
                estimator=self.inner_estimator,
            )
        return parameters, log_probs

    def meta_loss(self, buffer: MetaBuffer) -> torch.Tensor:
        """Mean over tasks of the surrogate whose gradient is the ``inner_estimator``'s
        meta-gradient (see the module docstring); its value is the adapted policies' loss
        on their post-adaptation trajectories (the DiCE term has value 0)."""
        dice = self.inner_estimator == "dice"
        adapted, pre_log_probs = self._replay(buffer, None, with_log_probs=dice)
        post = buffer.post_adaptation
        losses = policy_gradient_losses(self.policy, adapted, post)
        if pre_log_probs is not None:
            returns = post.scaled_mean_returns()
            losses = losses - (magic_box(pre_log_probs) - 1.0) * (
                returns - leave_one_out_mean(returns)
            )
        return losses.mean()

    def meta_step(
        self, tasks: torch.Tensor, generator: torch.Generator, iteration: int
    ) -> dict[str, float]:
        started = time.perf_counter()
        buffer, _, critic_loss = self.collect(tasks, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_loss(buffer)
        _check_finite(iteration, {"policy_loss": float(loss.detach()), "critic_loss": critic_loss})
        loss.backward()
        self.optimizer.step()
        self.baseline.step()
        policy_loss = float(loss.detach())
        return self._metrics(buffer, policy_loss, critic_loss, _elapsed(started, self.device))

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict | None) -> None:
        if state is not None:
            self.optimizer.load_state_dict(state)


def leave_one_out_mean(values: torch.Tensor) -> torch.Tensor:
    """For each entry of ``values`` [T], the mean of the others (0 when T = 1): a baseline
    independent of the entry's own samples."""
    count = values.shape[0]
    if count == 1:
        return torch.zeros_like(values)
    return (values.sum() - values) / (count - 1)


class ANILRL(MAMLRL):
    """ANIL for RL: MAML-RL whose inner loop adapts only the policy head."""

    algorithm = "anil_rl"

    def adapted_parameter_names(self) -> list[str]:
        return head_parameter_names(self.policy)


class JointPolicyGradient(RLMetaLearner):
    """Plain policy gradient on the mixture of tasks: no inner loop (``inner_steps`` 0).

    Per iteration it samples ``trajectories_per_task`` trajectories of each task with the
    current policy (the same sampling as a meta-learner's pre-adaptation batch) and takes
    one outer-optimizer step on their mean REINFORCE loss. Its pre- and post-adaptation
    returns are both that batch's.
    """

    algorithm = "joint_pg"

    def __init__(
        self,
        env: MetaRLEnvironment,
        policy: nn.Module,
        baseline: Baseline,
        trajectories_per_task: int,
        inner_lr: float,
        gamma: float,
        gae_lambda: float,
        outer_lr: float,
        outer_optimizer: str = "adam",
    ) -> None:
        super().__init__(
            env, policy, baseline, trajectories_per_task, inner_lr, 0, gamma, gae_lambda
        )
        self.optimizer = build_optimizer(policy, outer_optimizer, outer_lr)

    def meta_step(
        self, tasks: torch.Tensor, generator: torch.Generator, iteration: int
    ) -> dict[str, float]:
        started = time.perf_counter()
        buffer, _, critic_loss = self.collect(tasks, generator)
        batch = buffer.post_adaptation  # with no inner step, the only batch
        parameters = stack_parameters(dict(self.policy.named_parameters()), tasks.shape[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss = policy_gradient_losses(self.policy, parameters, batch).mean()
        _check_finite(iteration, {"policy_loss": float(loss.detach()), "critic_loss": critic_loss})
        loss.backward()
        self.optimizer.step()
        self.baseline.step()
        seconds = _elapsed(started, self.device)
        policy_loss = float(loss.detach())
        returns = float(batch.trajectories.episode_returns().mean())
        return {
            "policy_loss": policy_loss,
            "critic_loss": critic_loss,
            "total_loss": policy_loss + critic_loss,
            "pre_adaptation_return": returns,
            "post_adaptation_return": returns,
            "tasks_per_second": tasks.shape[0] / max(seconds, 1e-9),
        }

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict | None) -> None:
        if state is not None:
            self.optimizer.load_state_dict(state)


class ReptileRL(RLMetaLearner):
    """Reptile for RL: k inner policy-gradient steps per task, then interpolate toward them."""

    algorithm = "reptile_rl"

    def __init__(
        self,
        env: MetaRLEnvironment,
        policy: nn.Module,
        baseline: Baseline,
        trajectories_per_task: int,
        inner_lr: float,
        inner_steps: int,
        gamma: float,
        gae_lambda: float,
        epsilon: float,
        epsilon_final: float | None = None,
        iterations: int = 1,
    ) -> None:
        super().__init__(
            env, policy, baseline, trajectories_per_task, inner_lr, inner_steps, gamma, gae_lambda
        )
        self.epsilon = epsilon
        self.epsilon_final = epsilon if epsilon_final is None else epsilon_final
        self.iterations = iterations

    def epsilon_at(self, iteration: int) -> float:
        """The interpolation factor of 0-based ``iteration`` of ``iterations``: linear from
        ``epsilon`` (iteration 0) toward ``epsilon_final``. This is how
        openai/supervised-reptile anneals its outer step size (supervised_reptile/train.py
        mixes the initial and final sizes by the fraction of meta-iterations done; its
        published runs pass a final size of 0)."""
        done = min(iteration / self.iterations, 1.0)
        return done * self.epsilon_final + (1.0 - done) * self.epsilon

    @torch.no_grad()
    def interpolate(self, adapted: dict[str, torch.Tensor], epsilon: float) -> None:
        """theta += epsilon * (mean over tasks of adapted theta - theta)."""
        for name, parameter in self.policy.named_parameters():
            parameter.add_(epsilon * (adapted[name].mean(dim=0) - parameter))

    def meta_step(
        self, tasks: torch.Tensor, generator: torch.Generator, iteration: int
    ) -> dict[str, float]:
        started = time.perf_counter()
        buffer, adapted, critic_loss = self.collect(tasks, generator)
        with torch.no_grad():
            policy_loss = policy_gradient_losses(self.policy, adapted, buffer.post_adaptation)
        policy_loss_value = float(policy_loss.mean())
        losses = {"policy_loss": policy_loss_value, "critic_loss": critic_loss}
        if not all(bool(torch.isfinite(value).all()) for value in adapted.values()):
            losses["adapted_parameters"] = math.nan
        _check_finite(iteration, losses)
        self.interpolate(adapted, self.epsilon_at(iteration))
        self.baseline.step()
        seconds = _elapsed(started, self.device)
        return self._metrics(buffer, policy_loss_value, critic_loss, seconds)
