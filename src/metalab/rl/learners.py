"""MAML-RL, ANIL-RL and Reptile-RL over a shared inner loop.

One meta-iteration of every learner:
1. sample T tasks; for each, sample trajectories with the meta-policy, take inner
   policy-gradient steps (fresh trajectories before each step), sample post-adaptation
   trajectories; everything lands in a :class:`MetaBuffer` (no graph kept);
2. update the meta-parameters from the buffer.

MAML-RL replays the inner steps differentiably from the buffer (second-order, or
first-order with the inner gradients held constant) and minimises the policy-gradient
loss of the adapted policies on their post-adaptation trajectories with a plain Adam/SGD
step on the meta-parameters; like the MAML paper's estimator it does not differentiate
through the sampling distribution of the post-adaptation trajectories, and it uses no
TRPO. ANIL-RL is the same with only the head (mean layer + log-std, or logits) adapted
in the inner loop; the outer step still trains body and head. Reptile-RL moves the
meta-parameters toward the mean adapted parameters: theta += epsilon * (mean_i
theta_i' - theta).

A learner computes on its policy's device (environment and baseline on the same one);
``tasks_per_second`` waits for the device's queued work before reading the clock.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from metalab.device import synchronize
from metalab.rl.adaptation import inner_update, policy_gradient_losses, sample_adaptation
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
    ) -> None:
        super().__init__(
            env, policy, baseline, trajectories_per_task, inner_lr, inner_steps, gamma, gae_lambda
        )
        self.first_order = first_order
        if outer_optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                policy.parameters(), lr=outer_lr
            )
        elif outer_optimizer == "sgd":
            self.optimizer = torch.optim.SGD(policy.parameters(), lr=outer_lr)
        else:
            raise ValueError(f"unknown outer optimizer {outer_optimizer!r}")

    def adapt_from_buffer(
        self, buffer: MetaBuffer, create_graph: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Replay the buffer's inner steps from the meta-parameters, keeping the graph.

        Returns per-task adapted parameters [T, ...] that depend differentiably on the
        meta-parameters (through the inner gradients too unless first-order).
        """
        if create_graph is None:
            create_graph = not self.first_order
        parameters = stack_parameters(dict(self.policy.named_parameters()), buffer.num_tasks)
        for batch in buffer.pre_adaptation:
            parameters = inner_update(
                self.policy,
                parameters,
                batch,
                self.inner_lr,
                self.adapted_parameter_names(),
                create_graph=create_graph,
            )
        return parameters

    def meta_loss(self, buffer: MetaBuffer) -> torch.Tensor:
        """Mean over tasks of the adapted policies' loss on post-adaptation trajectories."""
        adapted = self.adapt_from_buffer(buffer)
        return policy_gradient_losses(self.policy, adapted, buffer.post_adaptation).mean()

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


class ANILRL(MAMLRL):
    """ANIL for RL: MAML-RL whose inner loop adapts only the policy head."""

    algorithm = "anil_rl"

    def adapted_parameter_names(self) -> list[str]:
        return head_parameter_names(self.policy)


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
    ) -> None:
        super().__init__(
            env, policy, baseline, trajectories_per_task, inner_lr, inner_steps, gamma, gae_lambda
        )
        self.epsilon = epsilon

    @torch.no_grad()
    def interpolate(self, adapted: dict[str, torch.Tensor]) -> None:
        """theta += epsilon * (mean over tasks of adapted theta - theta)."""
        for name, parameter in self.policy.named_parameters():
            parameter.add_(self.epsilon * (adapted[name].mean(dim=0) - parameter))

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
        self.interpolate(adapted)
        self.baseline.step()
        seconds = _elapsed(started, self.device)
        return self._metrics(buffer, policy_loss_value, critic_loss, seconds)
