"""Batched task families for meta-RL, written as plain tensor operations.

Every environment runs ``T`` tasks x ``N`` trajectories at once: observations are
``[T, N, observation_dim]`` tensors, one ``step`` advances all of them. A trajectory that
has finished stays finished (its ``done`` flag is sticky, its later steps are inactive and
earn zero reward) until every trajectory is done or the horizon is reached.

An environment lives on a device (``device``, default the CPU): tasks, states, rewards
and flags are created there. Random numbers are drawn on the generator's own device (the
CPU generator of a run) and then moved, so a run draws the same numbers on any device and
the CPU streams are those of a device-less run.

Two families with deliberately different structure:

- ``Navigation2D`` (the MAML paper's 2D navigation): continuous state and actions,
  deterministic dynamics, dense reward; the task (goal) is only visible through rewards.
- ``BernoulliBandit``: K discrete arms with per-task success probabilities, stochastic
  rewards, no spatial dynamics. It was chosen over "goal on a circle" because that family
  shares the navigation dynamics, observations and Gaussian action space, so a learner
  tuned to navigation would pass it unchanged; the bandit exercises a categorical policy,
  noisy rewards and a different observation (previous arm and reward), which keeps the
  track from being tuned to a single environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# Added to the run seed so held-out evaluation tasks never share a stream with training.
EVALUATION_SEED_OFFSET = 1_000_003


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` from ``generator``'s stream, delivered on ``device``.

    Drawn on the generator's device and moved, so the numbers do not depend on where the
    run computes (a CPU generator gives the same values for a CPU and a CUDA run).
    """
    draws = torch.rand(shape, generator=generator, dtype=dtype, device=generator.device)
    return draws.to(device)


@dataclass(frozen=True)
class StepResult:
    """What one batched step returns; all tensors are [T, N]."""

    state: object
    rewards: torch.Tensor  # float, 0 on inactive steps
    terminated: torch.Tensor  # bool, True exactly at the step a trajectory ends
    active: torch.Tensor  # bool, True if the trajectory was still running at this step


class MetaRLEnvironment(Protocol):
    """The interface the rollout code relies on."""

    name: str
    observation_dim: int
    horizon: int
    discrete_actions: bool
    action_dim: int  # Gaussian action dimension, or the number of arms when discrete
    device: torch.device  # where tasks, states and rewards live

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor: ...

    def reset(self, tasks: torch.Tensor, trajectories_per_task: int) -> object: ...

    def observe(self, state: object) -> torch.Tensor: ...

    def step(
        self, state: object, actions: torch.Tensor, generator: torch.Generator
    ) -> StepResult: ...

    def is_finished(self, state: object) -> bool: ...

    def oracle_actions(self, state: object) -> torch.Tensor: ...


@dataclass(frozen=True)
class NavigationState:
    goals: torch.Tensor  # [T, 2]
    positions: torch.Tensor  # [T, N, 2]
    done: torch.Tensor  # bool [T, N]
    step_count: int


class Navigation2D:
    """Point agent on the plane moving toward a hidden goal (MAML paper, section 5.3).

    Task: goal ~ U[-goal_range, goal_range]^2, tensor [T, 2]. State and observation: the
    position, starting at the origin. Action: a displacement clipped to
    [-max_step, max_step]^2. Reward: minus the (Euclidean) distance to the goal after the
    move. A trajectory ends when both coordinates are within ``goal_tolerance`` of the
    goal's (|dx|, |dy| < 0.01: the box the MAML paper's code and pytorch-maml-rl use, not
    a disc) or after ``horizon`` steps.
    """

    name = "navigation_2d"
    observation_dim = 2
    action_dim = 2
    discrete_actions = False

    def __init__(
        self,
        horizon: int = 100,
        goal_range: float = 0.5,
        max_step: float = 0.1,
        goal_tolerance: float = 0.01,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.horizon = horizon
        self.goal_range = goal_range
        self.max_step = max_step
        self.goal_tolerance = goal_tolerance
        self.dtype = dtype
        self.device = torch.device(device)

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        """Goals float [num_tasks, 2] on the environment's device, uniform in the square."""
        unit = uniform((num_tasks, 2), generator, self.dtype, self.device)
        return (2.0 * unit - 1.0) * self.goal_range

    def reset(self, tasks: torch.Tensor, trajectories_per_task: int) -> NavigationState:
        """Goals tasks [T, 2] -> every trajectory at the origin, on the tasks' device."""
        shape = (tasks.shape[0], trajectories_per_task)
        positions = torch.zeros(*shape, 2, dtype=tasks.dtype, device=tasks.device)
        done = torch.zeros(shape, dtype=torch.bool, device=tasks.device)
        return NavigationState(goals=tasks, positions=positions, done=done, step_count=0)

    def observe(self, state: NavigationState) -> torch.Tensor:
        """Positions float [T, N, 2]."""
        return state.positions

    def step(
        self, state: NavigationState, actions: torch.Tensor, generator: torch.Generator
    ) -> StepResult:
        """actions float [T, N, 2] (unclipped); finished trajectories do not move."""
        active = ~state.done
        moves = actions.clamp(-self.max_step, self.max_step)
        positions = torch.where(active.unsqueeze(-1), state.positions + moves, state.positions)
        distances = torch.linalg.vector_norm(positions - state.goals.unsqueeze(1), dim=-1)
        rewards = torch.where(active, -distances, torch.zeros_like(distances))
        offsets = (positions - state.goals.unsqueeze(1)).abs()
        reached = (offsets < self.goal_tolerance).all(dim=-1)
        out_of_time = state.step_count + 1 >= self.horizon
        terminated = active & (reached | out_of_time)
        next_state = NavigationState(
            goals=state.goals,
            positions=positions,
            done=state.done | terminated,
            step_count=state.step_count + 1,
        )
        return StepResult(next_state, rewards, terminated, active)

    def is_finished(self, state: NavigationState) -> bool:
        return bool(state.done.all())

    def oracle_actions(self, state: NavigationState) -> torch.Tensor:
        """The goal-aware reference: straight at the goal, as far as the action box allows
        (the last step lands on it). float [T, N, 2]."""
        offsets = state.goals.unsqueeze(1) - state.positions
        return offsets.clamp(-self.max_step, self.max_step)


@dataclass(frozen=True)
class BanditState:
    arm_probabilities: torch.Tensor  # [T, K]
    previous_actions: torch.Tensor  # int64 [T, N], -1 before the first pull
    previous_rewards: torch.Tensor  # [T, N]
    done: torch.Tensor  # bool [T, N]
    step_count: int


class BernoulliBandit:
    """K-armed Bernoulli bandit; one trajectory is ``horizon`` pulls.

    Task: arm success probabilities ~ U[0, 1]^K, tensor [T, K]. Observation: one-hot of
    the previous arm (zeros before the first pull) and the previous reward, [T, N, K + 1],
    so a memoryless policy can at best play win-stay/lose-shift; knowing which arm is best
    has to come from adaptation across trajectories. Action: arm index int64 [T, N].
    Reward: 1 with the arm's probability, else 0.

    Use a larger inner step than navigation's 0.1 (``inner_lr`` about 2): a policy-gradient
    step on normalised advantages moves categorical logits only slightly.
    """

    name = "bernoulli_bandit"
    discrete_actions = True

    def __init__(
        self,
        num_arms: int = 5,
        horizon: int = 100,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.action_dim = num_arms
        self.observation_dim = num_arms + 1
        self.horizon = horizon
        self.dtype = dtype
        self.device = torch.device(device)

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        """Arm success probabilities float [num_tasks, K] on the environment's device."""
        return uniform((num_tasks, self.action_dim), generator, self.dtype, self.device)

    def reset(self, tasks: torch.Tensor, trajectories_per_task: int) -> BanditState:
        """Probabilities tasks [T, K] -> no arm pulled yet, on the tasks' device."""
        shape = (tasks.shape[0], trajectories_per_task)
        return BanditState(
            arm_probabilities=tasks,
            previous_actions=torch.full(shape, -1, dtype=torch.int64, device=tasks.device),
            previous_rewards=torch.zeros(shape, dtype=tasks.dtype, device=tasks.device),
            done=torch.zeros(shape, dtype=torch.bool, device=tasks.device),
            step_count=0,
        )

    def observe(self, state: BanditState) -> torch.Tensor:
        """[T, N, K + 1]: one-hot previous arm, then previous reward."""
        pulled = state.previous_actions.clamp_min(0)
        one_hot = torch.nn.functional.one_hot(pulled, self.action_dim).to(self.dtype)
        one_hot = one_hot * (state.previous_actions >= 0).unsqueeze(-1).to(self.dtype)
        return torch.cat([one_hot, state.previous_rewards.unsqueeze(-1)], dim=-1)

    def step(
        self, state: BanditState, actions: torch.Tensor, generator: torch.Generator
    ) -> StepResult:
        """actions int64 [T, N] in 0..K-1."""
        active = ~state.done
        success_probability = torch.gather(state.arm_probabilities, 1, actions)
        draws = uniform(tuple(actions.shape), generator, self.dtype, actions.device)
        rewards = ((draws < success_probability) & active).to(self.dtype)
        out_of_time = state.step_count + 1 >= self.horizon
        terminated = active & out_of_time
        next_state = BanditState(
            arm_probabilities=state.arm_probabilities,
            previous_actions=torch.where(active, actions, state.previous_actions),
            previous_rewards=torch.where(active, rewards, state.previous_rewards),
            done=state.done | terminated,
            step_count=state.step_count + 1,
        )
        return StepResult(next_state, rewards, terminated, active)

    def is_finished(self, state: BanditState) -> bool:
        return bool(state.done.all())

    def oracle_actions(self, state: BanditState) -> torch.Tensor:
        """The task-aware reference: always the arm most likely to pay. int64 [T, N]."""
        best = state.arm_probabilities.argmax(dim=1, keepdim=True)
        return best.expand_as(state.previous_actions)


def build_environment(
    name: str,
    horizon: int,
    num_arms: int = 5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> MetaRLEnvironment:
    """The environment called ``name`` ("navigation_2d" or "bernoulli_bandit") on ``device``."""
    if name == "navigation_2d":
        return Navigation2D(horizon=horizon, dtype=dtype, device=device)
    if name == "bernoulli_bandit":
        return BernoulliBandit(num_arms=num_arms, horizon=horizon, dtype=dtype, device=device)
    raise ValueError(f"unknown environment {name!r}")


def evaluation_tasks(env: MetaRLEnvironment, num_tasks: int, seed: int) -> torch.Tensor:
    """Fixed held-out tasks [num_tasks, task_dim] for ``seed`` on the environment's device:
    the same values every call (and on every device), never a training draw."""
    generator = torch.Generator().manual_seed(seed + EVALUATION_SEED_OFFSET)
    return env.sample_tasks(num_tasks, generator)
