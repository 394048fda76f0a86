"""Sampling batches of trajectories for many tasks at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metalab.rl.envs import MetaRLEnvironment
from metalab.rl.policies import sampling_outputs


@dataclass(frozen=True)
class Trajectories:
    """N trajectories for each of T tasks, L = steps actually run (<= horizon).

    observations [T, N, L, obs_dim]; actions [T, N, L, A] float (Gaussian) or [T, N, L]
    int64 (discrete); rewards, log_probs float [T, N, L]; dones bool [T, N, L] (True at
    the step a trajectory ends); mask float [T, N, L] (1 on steps the trajectory was still
    running, 0 after it ended).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    mask: torch.Tensor
    log_probs: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.rewards.shape[0]

    @property
    def timesteps(self) -> torch.Tensor:
        """Step index of every entry, float [T, N, L], on the rewards' device."""
        steps = torch.arange(
            self.rewards.shape[-1], dtype=self.rewards.dtype, device=self.rewards.device
        )
        return steps.expand_as(self.rewards)

    def episode_returns(self) -> torch.Tensor:
        """Undiscounted return of each trajectory, [T, N]."""
        return self.rewards.sum(dim=-1)

    def task(self, index: int) -> Trajectories:
        """The trajectories of one task, keeping a task dimension of size 1."""
        return Trajectories(
            *(getattr(self, name)[index : index + 1] for name in _TRAJECTORY_FIELDS)
        )


_TRAJECTORY_FIELDS = ("observations", "actions", "rewards", "dones", "mask", "log_probs")


@torch.no_grad()
def sample_trajectories(
    env: MetaRLEnvironment,
    policy: nn.Module,
    task_parameters: dict[str, torch.Tensor],
    tasks: torch.Tensor,
    trajectories_per_task: int,
    generator: torch.Generator,
) -> Trajectories:
    """Run ``trajectories_per_task`` trajectories of each task with its own parameters.

    task_parameters: per-task policy parameters, each [T, ...]; tasks [T, task_dim]; all
    on the environment's device, where the trajectories are made. Stops early once every
    trajectory has ended.
    """
    state = env.reset(tasks, trajectories_per_task)
    steps: dict[str, list[torch.Tensor]] = {name: [] for name in _TRAJECTORY_FIELDS}
    for _ in range(env.horizon):
        observations = env.observe(state)
        outputs = sampling_outputs(policy, task_parameters, observations)
        actions = policy.sample(outputs, generator)
        log_probs = policy.log_prob(outputs, actions)
        result = env.step(state, actions, generator)
        steps["observations"].append(observations)
        steps["actions"].append(actions)
        steps["rewards"].append(result.rewards)
        steps["dones"].append(result.terminated)
        steps["mask"].append(result.active.to(result.rewards.dtype))
        steps["log_probs"].append(log_probs * result.active)
        state = result.state
        if env.is_finished(state):
            break
    return Trajectories(**{name: torch.stack(values, dim=2) for name, values in steps.items()})
