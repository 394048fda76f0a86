"""MAML-RL's meta-gradient estimators against the exact gradient of a bandit small enough
to enumerate.

Problem: 2-armed bandits with deterministic rewards, 1-step horizon, N = 2 trajectories
per task before and after one inner step. Every pre- and post-adaptation outcome is
enumerated with its probability, so both the exact objective
J(theta) = mean_tasks E_{tau ~ pi_theta}[ E_{a ~ pi_theta'(tau)}[r(a)] ] (differentiated by
autograd) and the exact expectation of each estimator's meta-gradient are computed
without sampling.
"""

import itertools

import pytest
import torch

from metalab.rl.adaptation import inner_update, policy_gradient_losses, trajectory_log_probs
from metalab.rl.baselines import LinearFeatureBaseline
from metalab.rl.buffer import MetaBuffer, ScoredTrajectories
from metalab.rl.config import RLExperimentConfig
from metalab.rl.envs import BernoulliBandit
from metalab.rl.learners import ANILRL, MAMLRL, leave_one_out_mean
from metalab.rl.policies import CategoricalMLPPolicy, stack_parameters
from metalab.rl.rollout import Trajectories

DOUBLE = torch.float64
ARMS = 2
TRAJECTORIES = 2
INNER_LR = 1.5
# Per-task reward of each arm; two tasks exercise the leave-one-task-out baseline.
ARM_REWARDS = torch.tensor([[0.2, 1.0], [0.9, -0.4]], dtype=DOUBLE)


def _policy() -> CategoricalMLPPolicy:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        policy = CategoricalMLPPolicy(ARMS + 1, ARMS, hidden_size=3, hidden_layers=1)
        # Larger weights than the default init, so the arms' probabilities differ clearly.
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.mul_(2.0)
    return policy.to(DOUBLE)


def _observations(num_tasks: int) -> torch.Tensor:
    env = BernoulliBandit(num_arms=ARMS, horizon=1, dtype=DOUBLE)
    state = env.reset(env.sample_tasks(num_tasks, torch.Generator().manual_seed(0)), TRAJECTORIES)
    return env.observe(state).unsqueeze(2)  # [T, N, 1, obs_dim]


def _batch(actions: torch.Tensor, observations: torch.Tensor) -> ScoredTrajectories:
    """actions int64 [T, N]: one step each, reward = the arm's reward, advantage = reward."""
    rewards = torch.gather(ARM_REWARDS[: actions.shape[0]], 1, actions).unsqueeze(-1)
    ones = torch.ones_like(rewards)
    trajectories = Trajectories(
        observations=observations,
        actions=actions.unsqueeze(-1),
        rewards=rewards,
        dones=ones.bool(),
        mask=ones,
        log_probs=torch.zeros_like(rewards),
    )
    return ScoredTrajectories(trajectories, rewards, torch.ones(actions.shape[0], dtype=DOUBLE))


def _outcomes(num_tasks: int) -> list[torch.Tensor]:
    """Every joint choice of arms [T, N]."""
    cells = num_tasks * TRAJECTORIES
    return [
        torch.tensor(choice).reshape(num_tasks, TRAJECTORIES)
        for choice in itertools.product(range(ARMS), repeat=cells)
    ]


def _probability(policy, parameters, batch: ScoredTrajectories) -> torch.Tensor:
    """Probability of the batch's joint outcome (all tasks, all trajectories)."""
    return trajectory_log_probs(policy, parameters, batch.trajectories).sum().exp()


def _learner(policy, estimator: str, algorithm=MAMLRL) -> MAMLRL:
    env = BernoulliBandit(num_arms=ARMS, horizon=1, dtype=DOUBLE)
    return algorithm(
        env=env,
        policy=policy,
        baseline=LinearFeatureBaseline(1e-5),
        trajectories_per_task=TRAJECTORIES,
        inner_lr=INNER_LR,
        inner_steps=1,
        gamma=1.0,
        gae_lambda=1.0,
        first_order=False,
        outer_lr=1e-3,
        inner_estimator=estimator,
    )


def _exact_gradient(learner: MAMLRL, num_tasks: int) -> list[torch.Tensor]:
    """grad of J(theta) by autograd over the enumerated pre-adaptation outcomes."""
    policy = learner.policy
    observations = _observations(num_tasks)
    shared = stack_parameters(dict(policy.named_parameters()), num_tasks)
    objective = torch.zeros((), dtype=DOUBLE)
    for actions in _outcomes(num_tasks):
        batch = _batch(actions, observations)
        adapted = inner_update(
            policy, shared, batch, INNER_LR, learner.adapted_parameter_names(), True
        )
        arm_probabilities = torch.softmax(
            torch.func.functional_call(policy, adapted, (observations[:, 0, 0],)), dim=-1
        )
        post_return = (arm_probabilities * ARM_REWARDS[:num_tasks]).sum(dim=-1).mean()
        objective = objective + _probability(policy, shared, batch) * post_return
    return torch.autograd.grad(objective, list(policy.parameters()))


def _expected_meta_gradient(learner: MAMLRL, num_tasks: int) -> list[torch.Tensor]:
    """Minus the exact expectation of the meta-loss gradient (an ascent direction on J)."""
    policy = learner.policy
    observations = _observations(num_tasks)
    expected = [torch.zeros_like(p) for p in policy.parameters()]
    for pre_actions in _outcomes(num_tasks):
        pre = _batch(pre_actions, observations)
        with torch.no_grad():
            shared = stack_parameters(dict(policy.named_parameters()), num_tasks)
            pre_probability = _probability(policy, shared, pre)
        with torch.enable_grad():
            adapted = inner_update(
                policy,
                {k: v.detach().requires_grad_() for k, v in shared.items()},
                pre,
                INNER_LR,
                learner.adapted_parameter_names(),
                False,
            )
        adapted = {name: value.detach() for name, value in adapted.items()}
        for post_actions in _outcomes(num_tasks):
            post = _batch(post_actions, observations)
            weight = pre_probability * _probability(policy, adapted, post)
            gradients = torch.autograd.grad(
                learner.meta_loss(MetaBuffer([pre], post)), list(policy.parameters())
            )
            for total, gradient in zip(expected, gradients, strict=True):
                total -= weight * gradient
    return expected


def _max_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))


def _max_norm(tensors: list[torch.Tensor]) -> float:
    return max(float(tensor.abs().max()) for tensor in tensors)


@pytest.mark.parametrize(("algorithm", "num_tasks"), [(MAMLRL, 1), (MAMLRL, 2), (ANILRL, 1)])
def test_dice_meta_gradient_is_unbiased_and_reinforce_is_not(num_tasks, algorithm):
    policy = _policy()
    exact = _exact_gradient(_learner(policy, "dice", algorithm), num_tasks)
    dice = _expected_meta_gradient(_learner(policy, "dice", algorithm), num_tasks)
    reinforce = _expected_meta_gradient(_learner(policy, "reinforce", algorithm), num_tasks)
    scale = _max_norm(exact)
    assert scale > 1e-3
    assert _max_difference(dice, exact) < 1e-10 * max(scale, 1.0)
    # REINFORCE misses the pre-adaptation sampling term: a clear, not a rounding, gap.
    assert _max_difference(reinforce, exact) > 0.05 * scale


def test_lvc_changes_only_the_second_derivative():
    policy = _policy()
    observations = _observations(1)
    batch = _batch(torch.tensor([[0, 1]]), observations)
    parameters = stack_parameters(dict(policy.named_parameters()), 1)
    names = [name for name, _ in policy.named_parameters()]
    first, second = (
        inner_update(policy, parameters, batch, INNER_LR, names, True, estimator)
        for estimator in ("reinforce", "lvc")
    )
    for name in names:
        torch.testing.assert_close(first[name], second[name])
    lvc_loss = policy_gradient_losses(policy, parameters, batch, "lvc").sum()
    plain_loss = policy_gradient_losses(policy, parameters, batch, "reinforce").sum()
    weight = dict(policy.named_parameters())["head.weight"]
    lvc_hessian_row, plain_hessian_row = (
        torch.autograd.grad(torch.autograd.grad(loss, weight, create_graph=True)[0][0, 0], weight)[
            0
        ]
        for loss in (lvc_loss, plain_loss)
    )
    assert float((lvc_hessian_row - plain_hessian_row).abs().max()) > 1e-4


def test_leave_one_out_mean_excludes_each_entry():
    values = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(leave_one_out_mean(values), torch.tensor([4.0, 3.5, 1.5]))
    torch.testing.assert_close(leave_one_out_mean(torch.tensor([5.0])), torch.tensor([0.0]))


def test_inner_estimator_is_validated():
    assert RLExperimentConfig().inner_estimator == "reinforce"
    assert RLExperimentConfig(inner_estimator="dice").inner_estimator == "dice"
    with pytest.raises(ValueError, match="inner_estimator"):
        RLExperimentConfig(inner_estimator="loaded")
    with pytest.raises(ValueError, match="not reptile_rl"):
        RLExperimentConfig(algorithm="reptile_rl", inner_estimator="lvc")
