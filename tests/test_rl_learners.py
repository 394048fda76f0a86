"""Policies, the policy-gradient inner step, MAML-RL / ANIL-RL / Reptile-RL updates."""

import math

import torch
from torch.func import functional_call

from metalab.rl.adaptation import (
    inner_update,
    policy_gradient_losses,
    sample_adaptation,
    score_trajectories,
)
from metalab.rl.baselines import LinearFeatureBaseline
from metalab.rl.envs import BernoulliBandit, Navigation2D
from metalab.rl.learners import ANILRL, MAMLRL, METRIC_NAMES, ReptileRL
from metalab.rl.policies import (
    build_policy,
    head_parameter_names,
    policy_outputs,
    sampling_outputs,
    stack_parameters,
)
from metalab.rl.rollout import sample_trajectories

DOUBLE = torch.float64


def _learner(kind, inner_steps=1, first_order=False, horizon=4, trajectories=3, hidden=4):
    env = Navigation2D(horizon=horizon, dtype=DOUBLE)
    policy = build_policy(env, hidden_size=hidden, init_std=0.5, seed=0, dtype=DOUBLE)
    common = dict(
        env=env,
        policy=policy,
        baseline=LinearFeatureBaseline(1e-5),
        trajectories_per_task=trajectories,
        inner_lr=0.5,
        inner_steps=inner_steps,
        gamma=0.9,
        gae_lambda=0.95,
    )
    if kind == "reptile":
        return ReptileRL(**common, epsilon=0.3)
    learner_class = MAMLRL if kind == "maml" else ANILRL
    return learner_class(**common, first_order=first_order, outer_lr=1e-3)


def _snapshot(policy):
    return {name: value.detach().clone() for name, value in policy.named_parameters()}


def test_per_task_functional_forward_matches_the_module_with_each_tasks_weights():
    env = Navigation2D(dtype=DOUBLE)
    policies = [build_policy(env, hidden_size=8, seed=seed, dtype=DOUBLE) for seed in range(3)]
    stacked = {
        name: torch.stack([dict(p.named_parameters())[name].detach() for p in policies])
        for name, _ in policies[0].named_parameters()
    }
    observations = torch.randn(3, 5, 7, 2, dtype=DOUBLE)
    outputs = policy_outputs(policies[0], stacked, observations)
    for task, policy in enumerate(policies):
        assert torch.allclose(outputs[task], policy(observations[task]))
    # The dispatch-free path used by rollouts computes the same outputs.
    assert torch.allclose(sampling_outputs(policies[0], stacked, observations), outputs)
    # Unstacked parameters through functional_call behave like the module itself.
    single = functional_call(policies[1], _snapshot(policies[1]), (observations[0],))
    assert torch.allclose(single, policies[1](observations[0]))


def test_categorical_policy_sampling_path_matches_functional_call():
    env = BernoulliBandit(num_arms=3, dtype=DOUBLE)
    policy = build_policy(env, hidden_size=8, seed=0, dtype=DOUBLE)
    stacked = stack_parameters(_snapshot(policy), 2)
    observations = torch.rand(2, 3, 4, dtype=DOUBLE)
    expected = policy_outputs(policy, stacked, observations)
    assert torch.allclose(sampling_outputs(policy, stacked, observations), expected)
    assert torch.allclose(expected[1], policy(observations[1]))


def test_anil_inner_loop_changes_only_the_head():
    learner = _learner("anil")
    tasks = learner.env.sample_tasks(2, torch.Generator().manual_seed(0))
    _, adapted, _ = learner.collect(tasks, torch.Generator().manual_seed(1))
    initial = _snapshot(learner.policy)
    head = set(head_parameter_names(learner.policy))
    assert head == {"head.mean.weight", "head.mean.bias", "head.log_std"}
    for name, value in adapted.items():
        expanded = initial[name].expand_as(value)
        if name in head:
            assert not torch.allclose(value, expanded), name
        else:
            assert torch.equal(value, expanded), name
    # The differentiable replay used for the outer loss keeps the body too.
    buffer, _, _ = learner.collect(tasks, torch.Generator().manual_seed(1))
    replayed = learner.adapt_from_buffer(buffer)
    for name in initial:
        if name not in head:
            assert torch.equal(replayed[name], initial[name].expand_as(replayed[name]))


def test_policy_gradient_step_moves_a_gaussian_mean_toward_the_best_action():
    # One-step navigation: reward = -|a - goal| with the goal inside the clipping box.
    env = Navigation2D(horizon=1, dtype=DOUBLE)
    policy = build_policy(env, hidden_size=4, init_std=0.05, seed=0, dtype=DOUBLE)
    goal = torch.tensor([[0.06, -0.04]], dtype=DOUBLE)
    parameters = _snapshot(policy)
    parameters["head.mean.weight"].zero_()
    parameters["head.mean.bias"].zero_()
    trainable = {k: v.requires_grad_(True) for k, v in stack_parameters(parameters, 1).items()}
    trajectories = sample_trajectories(
        env, policy, trainable, goal, 2000, torch.Generator().manual_seed(0)
    )
    batch, _ = score_trajectories(trajectories, LinearFeatureBaseline(), 0.99, 1.0)
    adapted = inner_update(policy, trainable, batch, 0.01, ["head.mean.bias"], False)
    step = adapted["head.mean.bias"][0].detach()
    assert step[0] > 0 and step[1] < 0
    cosine = torch.nn.functional.cosine_similarity(step, goal[0], dim=0)
    assert cosine > 0.9


def test_policy_gradient_step_raises_the_probability_of_the_best_arm():
    env = BernoulliBandit(num_arms=4, horizon=1, dtype=DOUBLE)
    policy = build_policy(env, hidden_size=4, seed=0, dtype=DOUBLE)
    arms = torch.tensor([[0.1, 0.9, 0.2, 0.3]], dtype=DOUBLE)
    parameters = _snapshot(policy)
    parameters["head.weight"].zero_()  # start from the uniform policy
    parameters["head.bias"].zero_()
    trainable = {k: v.requires_grad_(True) for k, v in stack_parameters(parameters, 1).items()}
    trajectories = sample_trajectories(
        env, policy, trainable, arms, 500, torch.Generator().manual_seed(0)
    )
    batch, _ = score_trajectories(trajectories, LinearFeatureBaseline(), 0.99, 1.0)
    adapted = inner_update(policy, trainable, batch, 0.5, head_parameter_names(policy), False)
    first_observation = torch.zeros(1, 1, 5, dtype=DOUBLE)
    before = torch.softmax(policy_outputs(policy, trainable, first_observation), -1)
    after = torch.softmax(policy_outputs(policy, adapted, first_observation), -1)
    assert torch.allclose(before, torch.full_like(before, 0.25))
    assert after[0, 0, 1] > 0.25 + 0.02
    assert after[0, 0, 1] == after[0, 0].max()
    assert after[0, 0, 0] < 0.25


def _flat_gradient_by_central_differences(learner, buffer, step=1e-6):
    gradients = {}
    with torch.no_grad():
        parameters = dict(learner.policy.named_parameters())
    for name, parameter in parameters.items():
        gradient = torch.zeros_like(parameter)
        flat = parameter.data.view(-1)
        for index in range(flat.numel()):
            original = flat[index].item()
            flat[index] = original + step
            plus = float(learner.meta_loss(buffer).detach())
            flat[index] = original - step
            minus = float(learner.meta_loss(buffer).detach())
            flat[index] = original
            gradient.view(-1)[index] = (plus - minus) / (2 * step)
        gradients[name] = gradient
    return gradients


def test_second_order_maml_meta_gradient_matches_finite_differences():
    learner = _learner("maml", inner_steps=2)
    tasks = learner.env.sample_tasks(2, torch.Generator().manual_seed(0))
    buffer, _, _ = learner.collect(tasks, torch.Generator().manual_seed(1))
    learner.policy.zero_grad()
    learner.meta_loss(buffer).backward()
    analytic = {name: p.grad.clone() for name, p in learner.policy.named_parameters()}
    numeric = _flat_gradient_by_central_differences(learner, buffer)
    for name in analytic:
        assert torch.allclose(analytic[name], numeric[name], rtol=1e-5, atol=1e-7), name
    # The second-order term is not negligible here: first-order differs.
    learner.first_order = True
    learner.policy.zero_grad()
    learner.meta_loss(buffer).backward()
    difference = sum(
        (p.grad - analytic[name]).abs().sum() for name, p in learner.policy.named_parameters()
    )
    assert difference > 1e-4


def test_first_order_meta_gradient_is_the_mean_post_adaptation_gradient():
    learner = _learner("maml", first_order=True)
    tasks = learner.env.sample_tasks(3, torch.Generator().manual_seed(0))
    buffer, _, _ = learner.collect(tasks, torch.Generator().manual_seed(1))
    learner.policy.zero_grad()
    learner.meta_loss(buffer).backward()
    adapted = {
        name: value.detach().requires_grad_(True)
        for name, value in learner.adapt_from_buffer(buffer).items()
    }
    losses = policy_gradient_losses(learner.policy, adapted, buffer.post_adaptation)
    per_task = torch.autograd.grad(losses.mean(), list(adapted.values()))
    named = learner.policy.named_parameters()
    for (name, parameter), gradient in zip(named, per_task, strict=True):
        assert torch.allclose(parameter.grad, gradient.sum(dim=0)), name


def test_reptile_moves_epsilon_of_the_way_to_the_mean_adapted_weights():
    learner = _learner("reptile", inner_steps=3)
    tasks = learner.env.sample_tasks(4, torch.Generator().manual_seed(0))
    initial = _snapshot(learner.policy)
    generator = torch.Generator().manual_seed(5)
    _, adapted, _ = learner.collect(tasks, torch.Generator().manual_seed(5))
    metrics = learner.meta_step(tasks, generator, iteration=0)
    assert math.isfinite(metrics["policy_loss"])
    for name, parameter in learner.policy.named_parameters():
        expected = initial[name] + 0.3 * (adapted[name].mean(dim=0) - initial[name])
        assert torch.allclose(parameter, expected, atol=1e-12), name
        assert not torch.allclose(parameter, initial[name]), name


def test_maml_step_updates_every_parameter_and_reports_metrics():
    learner = _learner("maml")
    tasks = learner.env.sample_tasks(2, torch.Generator().manual_seed(0))
    initial = _snapshot(learner.policy)
    metrics = learner.meta_step(tasks, torch.Generator().manual_seed(1), iteration=0)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["critic_loss"] == 0.0
    assert metrics["total_loss"] == metrics["policy_loss"]
    for name, parameter in learner.policy.named_parameters():
        assert not torch.equal(parameter, initial[name]), name


def test_adaptation_sampling_uses_fresh_trajectories_per_step():
    learner = _learner("maml", inner_steps=2)
    tasks = learner.env.sample_tasks(2, torch.Generator().manual_seed(0))
    buffer, adapted, _ = sample_adaptation(
        learner.env,
        learner.policy,
        tasks,
        3,
        2,
        0.5,
        head_parameter_names(learner.policy),
        learner.baseline,
        0.9,
        1.0,
        torch.Generator().manual_seed(0),
    )
    assert len(buffer.pre_adaptation) == 2 and buffer.post_adaptation is not None
    first, second = (batch.trajectories.actions for batch in buffer.pre_adaptation)
    assert not torch.equal(first, second)
    assert buffer.task(1).pre_adaptation[0].trajectories.num_tasks == 1
