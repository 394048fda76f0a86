"""The inner loop shared by every learner: score trajectories, take policy-gradient steps.

The inner step is vanilla policy gradient (REINFORCE with a baseline): per task, the loss
is minus the mean over valid steps of log pi(a|s) * A with GAE advantages normalised per
task, and the adapted parameters are ``theta - inner_lr * grad``. All T tasks are adapted
at once: per-task parameters carry a leading task dimension and the per-task losses are
summed, so one backward pass yields every task's own gradient. Everything computes on
the device of the policy and the tasks (the environment's); nothing here creates a tensor
of its own.

The inner loss comes in the forms of ``INNER_ESTIMATORS``; all have the same first
derivative (the inner step is the same) and differ only in what differentiating the step
again (MAML's second-order term) estimates; see :mod:`metalab.rl.learners`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from metalab.rl.advantages import (
    advantage_std,
    discounted_returns,
    generalized_advantages,
    normalize_advantages,
)
from metalab.rl.baselines import Baseline
from metalab.rl.buffer import MetaBuffer, ScoredTrajectories
from metalab.rl.envs import MetaRLEnvironment
from metalab.rl.policies import policy_outputs, stack_parameters
from metalab.rl.rollout import Trajectories, sample_trajectories

InnerEstimator = Literal["reinforce", "lvc", "dice"]
INNER_ESTIMATORS: tuple[str, ...] = ("reinforce", "lvc", "dice")


def magic_box(log_prob: torch.Tensor) -> torch.Tensor:
    """DiCE's magic-box: exp(x - stop_grad(x)), value 1, derivative magic_box(x) * dx."""
    return torch.exp(log_prob - log_prob.detach())


def score_trajectories(
    trajectories: Trajectories,
    baseline: Baseline,
    gamma: float,
    gae_lambda: float,
    track_meta_gradient: bool = False,
) -> tuple[ScoredTrajectories, float]:
    """Fit the baseline on the batch, return normalised GAE advantages and the critic loss."""
    returns = discounted_returns(trajectories.rewards, trajectories.dones, gamma)
    values, critic_loss = baseline.fit_predict(trajectories, returns, track_meta_gradient)
    advantages = generalized_advantages(
        trajectories.rewards, values, trajectories.dones, gamma, gae_lambda
    )
    mask = trajectories.mask
    normalized = normalize_advantages(advantages, mask)
    steps_per_trajectory = mask.sum(dim=(1, 2)) / mask.shape[1]
    scale = 1.0 / ((advantage_std(advantages, mask).flatten() + 1e-8) * steps_per_trajectory)
    scored = ScoredTrajectories(trajectories, normalized.detach(), scale.detach())
    return scored, critic_loss


def trajectory_log_probs(
    policy: nn.Module, task_parameters: dict[str, torch.Tensor], trajectories: Trajectories
) -> torch.Tensor:
    """log pi(a_t | s_t) of every stored step under ``task_parameters``, [T, N, L]; 0 on
    masked steps."""
    outputs = policy_outputs(policy, task_parameters, trajectories.observations)
    return policy.log_prob(outputs, trajectories.actions) * trajectories.mask


def policy_gradient_losses(
    policy: nn.Module,
    task_parameters: dict[str, torch.Tensor],
    batch: ScoredTrajectories,
    estimator: InnerEstimator = "reinforce",
) -> torch.Tensor:
    """Per-task policy-gradient loss [T]; task_parameters each [T, ...].

    ``reinforce`` (and ``dice``, whose extra term lives in the outer objective): minus the
    mean over valid steps of log pi(a|s) * A. ``lvc`` (ProMP's low-variance curvature):
    minus the mean of pi(a|s) / stop_grad(pi(a|s)) * A, the same first derivative, whose
    second derivative adds each step's outer product of score functions.
    """
    trajectories = batch.trajectories
    log_probs = trajectory_log_probs(policy, task_parameters, trajectories)
    if estimator == "lvc":
        log_probs = magic_box(log_probs)
    mask = trajectories.mask
    weighted = (log_probs * batch.advantages * mask).sum(dim=(1, 2))
    return -weighted / mask.sum(dim=(1, 2)).clamp_min(1.0)


def inner_update(
    policy: nn.Module,
    task_parameters: dict[str, torch.Tensor],
    batch: ScoredTrajectories,
    inner_lr: float,
    adapted_names: Sequence[str],
    create_graph: bool,
    estimator: InnerEstimator = "reinforce",
) -> dict[str, torch.Tensor]:
    """One policy-gradient step per task on the parameters in ``adapted_names``.

    With ``create_graph`` the step stays differentiable (second-order meta-gradients);
    without it the step is a constant shift (first-order). Other names pass through.
    ``estimator`` picks the inner loss's form (same step, different second derivative).
    """
    losses = policy_gradient_losses(policy, task_parameters, batch, estimator)
    targets = [task_parameters[name] for name in adapted_names]
    gradients = torch.autograd.grad(losses.sum(), targets, create_graph=create_graph)
    adapted = dict(task_parameters)
    for name, gradient in zip(adapted_names, gradients, strict=True):
        adapted[name] = task_parameters[name] - inner_lr * gradient
    return adapted


def sample_adaptation(
    env: MetaRLEnvironment,
    policy: nn.Module,
    tasks: torch.Tensor,
    trajectories_per_task: int,
    inner_steps: int,
    inner_lr: float | Sequence[float],
    adapted_names: Sequence[str],
    baseline: Baseline,
    gamma: float,
    gae_lambda: float,
    generator: torch.Generator,
    track_meta_gradient: bool = False,
) -> tuple[MetaBuffer, dict[str, torch.Tensor], float]:
    """Sample, adapt ``inner_steps`` times (fresh trajectories before each step), sample again.

    Starts from the policy's parameters. Returns the filled meta-buffer, the adapted
    per-task parameters (detached, [T, ...] each) and the mean critic loss of the baseline
    fits; ``track_meta_gradient`` lets a trainable baseline accumulate its meta-gradient.
    No graph to the policy's parameters is kept. ``inner_lr``: one step size, or one per
    inner step.
    """
    step_sizes = [inner_lr] * inner_steps if isinstance(inner_lr, float | int) else inner_lr
    if len(step_sizes) != inner_steps:
        raise ValueError(f"{len(step_sizes)} step sizes for {inner_steps} inner steps")
    shared = {name: value.detach() for name, value in policy.named_parameters()}
    parameters = stack_parameters(shared, tasks.shape[0])
    buffer = MetaBuffer()
    critic_losses = []
    for step in range(inner_steps + 1):
        trajectories = sample_trajectories(
            env, policy, parameters, tasks, trajectories_per_task, generator
        )
        batch, critic_loss = score_trajectories(
            trajectories, baseline, gamma, gae_lambda, track_meta_gradient
        )
        critic_losses.append(critic_loss)
        if step == inner_steps:
            buffer.post_adaptation = batch
            break
        buffer.pre_adaptation.append(batch)
        with torch.enable_grad():
            trainable = {
                name: value.detach().requires_grad_(name in adapted_names)
                for name, value in parameters.items()
            }
            updated = inner_update(
                policy, trainable, batch, step_sizes[step], adapted_names, create_graph=False
            )
        parameters = {name: value.detach() for name, value in updated.items()}
    return buffer, parameters, sum(critic_losses) / len(critic_losses)
