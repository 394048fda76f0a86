"""Environment dynamics and batched rollouts of the meta-RL track."""

import math

import pytest
import torch

from metalab.rl.envs import BernoulliBandit, Navigation2D, build_environment, evaluation_tasks
from metalab.rl.policies import build_policy, stack_parameters
from metalab.rl.rollout import sample_trajectories


def _step(env, state, actions):
    return env.step(state, torch.tensor(actions, dtype=torch.float32), torch.Generator())


def test_navigation_clips_actions_and_rewards_minus_distance_after_the_move():
    env = Navigation2D(horizon=100)
    goals = torch.tensor([[0.3, -0.2]])
    state = env.reset(goals, trajectories_per_task=2)
    assert torch.equal(env.observe(state), torch.zeros(1, 2, 2))
    result = _step(env, state, [[[0.5, -0.03], [-1.0, 2.0]]])
    expected_positions = torch.tensor([[[0.1, -0.03], [-0.1, 0.1]]])
    assert torch.allclose(result.state.positions, expected_positions)
    expected_rewards = -torch.linalg.vector_norm(expected_positions - goals[:, None], dim=-1)
    assert torch.allclose(result.rewards, expected_rewards)
    assert not result.terminated.any()
    assert result.active.all()


def test_navigation_terminates_within_tolerance_and_masks_afterwards():
    env = Navigation2D(horizon=100)
    goals = torch.tensor([[0.1, 0.0]])
    state = env.reset(goals, trajectories_per_task=2)
    # Trajectory 0 lands 0.005 from the goal (< 0.01): done; trajectory 1 stops 0.02 short.
    first = _step(env, state, [[[0.095, 0.0], [0.08, 0.0]]])
    assert first.terminated.tolist() == [[True, False]]
    assert first.state.done.tolist() == [[True, False]]
    assert torch.allclose(first.rewards, torch.tensor([[-0.005, -0.02]]), atol=1e-6)
    second = _step(env, first.state, [[[0.1, 0.1], [0.02, 0.0]]])
    assert second.active.tolist() == [[False, True]]
    assert second.terminated.tolist() == [[False, True]]
    assert second.rewards[0, 0] == 0.0
    # The finished trajectory did not move.
    assert torch.allclose(second.state.positions[0, 0], torch.tensor([0.095, 0.0]))
    assert env.is_finished(second.state)


def test_navigation_ends_at_the_horizon():
    env = Navigation2D(horizon=3)
    state = env.reset(torch.tensor([[0.5, 0.5]]), trajectories_per_task=1)
    for step in range(3):
        result = _step(env, state, [[[0.0, 0.0]]])
        assert result.terminated.item() == (step == 2)
        state = result.state
    assert env.is_finished(state)


def test_tasks_are_seeded_and_held_out_tasks_fixed():
    env = Navigation2D()
    first = env.sample_tasks(50, torch.Generator().manual_seed(3))
    again = env.sample_tasks(50, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert first.abs().max() <= 0.5
    held_out = evaluation_tasks(env, 10, seed=3)
    assert torch.equal(held_out, evaluation_tasks(env, 10, seed=3))
    assert not torch.equal(held_out, first[:10])
    assert not torch.equal(held_out, evaluation_tasks(env, 10, seed=4))


def test_bandit_rewards_follow_arm_probabilities_and_observations_encode_the_last_pull():
    env = BernoulliBandit(num_arms=3, horizon=2)
    tasks = torch.tensor([[0.0, 1.0, 0.0]])
    state = env.reset(tasks, trajectories_per_task=2)
    assert torch.equal(env.observe(state), torch.zeros(1, 2, 4))
    result = env.step(state, torch.tensor([[1, 2]]), torch.Generator().manual_seed(0))
    assert result.rewards.tolist() == [[1.0, 0.0]]
    assert env.observe(result.state).tolist() == [[[0, 1, 0, 1], [0, 0, 1, 0]]]
    last = env.step(result.state, torch.tensor([[0, 1]]), torch.Generator().manual_seed(0))
    assert last.terminated.all() and env.is_finished(last.state)


def test_rollout_keeps_finished_trajectories_masked_until_all_are_done():
    env = Navigation2D(horizon=100)
    policy = build_policy(env, hidden_size=4)
    parameters = {name: value.detach().clone() for name, value in policy.named_parameters()}
    # A deterministic policy stepping (0.1, 0) every time.
    parameters["head.mean.weight"].zero_()
    parameters["head.mean.bias"].copy_(torch.tensor([0.1, 0.0]))
    parameters["head.log_std"].fill_(math.log(1e-9))
    goals = torch.tensor([[0.1, 0.0], [0.2, 0.0]])
    trajectories = sample_trajectories(
        env, policy, stack_parameters(parameters, 2), goals, 3, torch.Generator().manual_seed(0)
    )
    assert trajectories.rewards.shape == (2, 3, 2)  # stopped after 2 of 100 steps
    assert trajectories.mask[0].tolist() == [[1.0, 0.0]] * 3
    assert trajectories.mask[1].tolist() == [[1.0, 1.0]] * 3
    assert trajectories.dones[0].tolist() == [[True, False]] * 3
    assert trajectories.dones[1].tolist() == [[False, True]] * 3
    assert torch.all(trajectories.rewards[0, :, 1] == 0.0)
    assert torch.all(trajectories.log_probs[0, :, 1] == 0.0)
    assert torch.allclose(trajectories.rewards[1, :, 0], torch.full((3,), -0.1), atol=1e-6)


def test_unknown_environment_is_rejected():
    with pytest.raises(ValueError):
        build_environment("half_cheetah", horizon=10)


def test_navigation_oracle_reaches_every_goal_in_the_fewest_steps():
    env = Navigation2D(dtype=torch.float64)
    goals = torch.tensor([[0.35, -0.12], [-0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    state = env.reset(goals, 2)
    steps = 0
    while not env.is_finished(state):
        result = env.step(state, env.oracle_actions(state), torch.Generator())
        state, steps = result.state, steps + 1
    assert steps == 5  # the farthest goal is 0.5 away along each axis, 0.1 per step
    distances = torch.linalg.vector_norm(state.positions - goals.unsqueeze(1), dim=-1)
    assert bool((distances < env.goal_tolerance).all())


def test_bandit_oracle_always_pulls_the_best_arm():
    env = BernoulliBandit(num_arms=4, horizon=3, dtype=torch.float64)
    tasks = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.6, 0.1, 0.2, 0.7]], dtype=torch.float64)
    actions = env.oracle_actions(env.reset(tasks, 5))
    assert actions.shape == (2, 5) and actions.dtype == torch.int64
    assert bool((actions[0] == 1).all()) and bool((actions[1] == 3).all())
