"""Returns, GAE, normalisation and the value baselines of the meta-RL track."""

import torch

from metalab.rl.advantages import discounted_returns, generalized_advantages, normalize_advantages
from metalab.rl.baselines import LinearFeatureBaseline, MLPCriticBaseline
from metalab.rl.rollout import Trajectories

REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
VALUES = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
DONES = torch.tensor([False, True, False, False])  # an episode ends at step 1


def test_gae_matches_a_hand_computed_four_step_example_with_a_done():
    # gamma 0.9, lambda 0.8, V after the last step = 0:
    # delta_3 = 4 - 2 = 2;               A_3 = 2
    # delta_2 = 3 + 0.9 * 2 - 1.5 = 3.3;  A_2 = 3.3 + 0.72 * 2 = 4.74
    # delta_1 = 2 - 1 = 1 (done: no bootstrap);  A_1 = 1
    # delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4;  A_0 = 1.4 + 0.72 * 1 = 2.12
    advantages = generalized_advantages(REWARDS, VALUES, DONES, gamma=0.9, gae_lambda=0.8)
    expected = torch.tensor([2.12, 1.0, 4.74, 2.0], dtype=torch.float64)
    assert torch.allclose(advantages, expected)


def test_discounted_returns_stop_at_dones():
    returns = discounted_returns(REWARDS, DONES, gamma=0.9)
    expected = torch.tensor([1 + 0.9 * 2, 2.0, 3 + 0.9 * 4, 4.0], dtype=torch.float64)
    assert torch.allclose(returns, expected)


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.randn(3, 2, 6, dtype=torch.float64)
    values = torch.randn(3, 2, 6, dtype=torch.float64)
    dones = torch.zeros(3, 2, 6, dtype=torch.bool)
    dones[..., -1] = True
    advantages = generalized_advantages(rewards, values, dones, gamma=0.95, gae_lambda=1.0)
    expected = discounted_returns(rewards, dones, gamma=0.95) - values
    assert torch.allclose(advantages, expected)


def test_normalisation_is_per_task_over_valid_steps():
    advantages = torch.tensor([[[1.0, 2.0, 99.0]], [[10.0, 30.0, 50.0]]])
    mask = torch.tensor([[[1.0, 1.0, 0.0]], [[1.0, 1.0, 1.0]]])
    normalized = normalize_advantages(advantages, mask)
    assert torch.allclose(normalized[0, 0], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-6)
    population_std = torch.tensor([10.0, 30.0, 50.0]).std(unbiased=False)
    expected = (torch.tensor([10.0, 30.0, 50.0]) - 30.0) / population_std
    assert torch.allclose(normalized[1, 0], expected, atol=1e-6)


def _trajectories(observations: torch.Tensor, mask: torch.Tensor) -> Trajectories:
    shape = mask.shape
    zeros = torch.zeros(shape, dtype=observations.dtype)
    return Trajectories(
        observations=observations,
        actions=torch.zeros(*shape, 2, dtype=observations.dtype),
        rewards=zeros,
        dones=torch.zeros(shape, dtype=torch.bool),
        mask=mask,
        log_probs=zeros,
    )


def test_linear_baseline_recovers_returns_linear_in_its_features():
    generator = torch.Generator().manual_seed(0)
    observations = torch.rand(2, 5, 7, 2, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 5, 7, dtype=torch.float64)
    mask[1, :, 5:] = 0.0
    time = torch.arange(7, dtype=torch.float64) / 100.0
    # Different coefficients per task: the fit must be per task.
    returns = torch.stack(
        [
            3.0 * observations[0, ..., 0] - 2.0 * time + 1.0,
            observations[1, ..., 1].pow(2) + 5.0 * time.pow(2) - 4.0,
        ]
    )
    values, critic_loss = LinearFeatureBaseline(1e-10).fit_predict(
        _trajectories(observations, mask), returns
    )
    assert critic_loss == 0.0
    assert torch.allclose(values, returns * mask, atol=1e-5)
    assert torch.all(values[1, :, 5:] == 0.0)


def test_mlp_critic_fit_reduces_error_and_accumulates_a_meta_gradient():
    generator = torch.Generator().manual_seed(1)
    observations = torch.rand(3, 4, 10, 2, generator=generator)
    mask = torch.ones(3, 4, 10)
    returns = observations.sum(-1) * torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1)
    trajectories = _trajectories(observations, mask)
    errors = []
    for fit_steps in (1, 60):
        baseline = MLPCriticBaseline(2, hidden_size=16, fit_steps=fit_steps, fit_lr=0.01, seed=0)
        values, critic_loss = baseline.fit_predict(trajectories, returns, True)
        errors.append(critic_loss)
        assert values.shape == returns.shape
        grads = [p.grad for p in baseline.critic.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert errors[1] < 0.5 * errors[0]
