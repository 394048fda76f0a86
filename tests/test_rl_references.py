"""Issue 19's remaining points: the joint policy-gradient ("pretrained") reference, seeds
(per-stage training seed, shared held-out tasks), Reptile's epsilon annealing, the
navigation goal box, the Gaussian std floor and the default pipeline's RL experiments."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from metalab.rl import RLExperimentConfig, evaluate_rl, train_rl
from metalab.rl.adaptation import policy_gradient_losses, sample_adaptation
from metalab.rl.baselines import LinearFeatureBaseline
from metalab.rl.config import dvc_stage_key, run_name, with_seed
from metalab.rl.envs import Navigation2D
from metalab.rl.learners import JointPolicyGradient, ReptileRL
from metalab.rl.loop import RLTrainer, build_components, build_learner, trained_adaptation_steps
from metalab.rl.policies import build_policy, policy_outputs, sampling_outputs, stack_parameters

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = torch.float64


def _tiny(**overrides) -> RLExperimentConfig:
    settings = dict(
        iterations=3,
        meta_batch_size=3,
        trajectories_per_task=4,
        horizon=8,
        hidden_size=8,
        eval_tasks=4,
        eval_trajectories_per_task=4,
        eval_adaptation_steps=[1],
    )
    settings.update(overrides)
    return RLExperimentConfig(**settings)


# ---------------------------------------------------------------- navigation goal box


def test_navigation_ends_inside_the_goal_box_not_the_disc():
    env = Navigation2D(horizon=5, dtype=DOUBLE)
    goals = torch.zeros(3, 2, dtype=DOUBLE)
    # L2 distances 0.0113 (inside the box, outside the disc), 0.012 and 0.0099 (in both).
    moves = torch.tensor([[[0.008, 0.008]], [[0.012, 0.0]], [[0.0, 0.0099]]], dtype=DOUBLE)
    result = env.step(env.reset(goals, 1), moves, torch.Generator())
    assert result.terminated[:, 0].tolist() == [True, False, True]
    assert result.rewards[0, 0].item() == pytest.approx(-math.hypot(0.008, 0.008))


# ---------------------------------------------------------------- Gaussian std floor


def test_gaussian_std_is_floored_in_both_forwards_with_no_gradient_below_the_floor():
    env = Navigation2D(dtype=DOUBLE)
    policy = build_policy(env, hidden_size=4, init_std=0.5, seed=0, dtype=DOUBLE, min_std=0.1)
    parameters = stack_parameters(dict(policy.named_parameters()), 2)
    below = torch.full((2, 2), math.log(1e-3), dtype=DOUBLE, requires_grad=True)
    parameters["head.log_std"] = below
    observations = torch.randn(2, 3, 2, dtype=DOUBLE)
    outputs = policy_outputs(policy, parameters, observations)
    floor = torch.full((2, 3, 2), math.log(0.1), dtype=DOUBLE)
    assert torch.allclose(outputs[..., 2:], floor)
    with torch.no_grad():
        assert torch.allclose(sampling_outputs(policy, parameters, observations)[..., 2:], floor)
    actions = torch.zeros(2, 3, 2, dtype=DOUBLE)
    (gradient,) = torch.autograd.grad(policy.log_prob(outputs, actions).sum(), below)
    assert torch.equal(gradient, torch.zeros_like(gradient))
    # Above the floor the std is the parameter's.
    parameters["head.log_std"] = torch.full((2, 2), math.log(0.3), dtype=DOUBLE)
    outputs = policy_outputs(policy, parameters, observations)
    assert torch.allclose(outputs[..., 2:], torch.full_like(floor, math.log(0.3)))


def test_std_floor_must_lie_below_the_initial_std():
    with pytest.raises(ValidationError, match="min_std"):
        RLExperimentConfig(init_std=0.5, min_std=0.6)
    assert RLExperimentConfig().min_std == 1e-6  # pytorch-maml-rl's floor


# ---------------------------------------------------------------- Reptile annealing


def _reptile(**kwargs) -> ReptileRL:
    env = Navigation2D(horizon=4, dtype=DOUBLE)
    return ReptileRL(
        env=env,
        policy=build_policy(env, hidden_size=4, init_std=0.5, seed=0, dtype=DOUBLE),
        baseline=LinearFeatureBaseline(1e-5),
        trajectories_per_task=3,
        inner_lr=0.5,
        inner_steps=2,
        gamma=0.9,
        gae_lambda=0.95,
        **kwargs,
    )


def test_reptile_epsilon_goes_linearly_to_its_final_value():
    learner = _reptile(epsilon=0.5, epsilon_final=0.0, iterations=10)
    assert [learner.epsilon_at(i) for i in (0, 5, 10)] == pytest.approx([0.5, 0.25, 0.0])
    assert _reptile(epsilon=0.3, iterations=10).epsilon_at(7) == pytest.approx(0.3)


def test_reptile_meta_step_interpolates_by_the_annealed_epsilon():
    learner = _reptile(epsilon=0.8, epsilon_final=0.0, iterations=4)
    tasks = learner.env.sample_tasks(3, torch.Generator().manual_seed(0))
    initial = {name: value.detach().clone() for name, value in learner.policy.named_parameters()}
    _, adapted, _ = learner.collect(tasks, torch.Generator().manual_seed(5))
    learner.meta_step(tasks, torch.Generator().manual_seed(5), iteration=3)  # epsilon 0.2
    for name, parameter in learner.policy.named_parameters():
        expected = initial[name] + 0.2 * (adapted[name].mean(dim=0) - initial[name])
        assert torch.allclose(parameter, expected, atol=1e-12), name


def test_reptile_config_anneals_to_zero_by_default_over_its_iterations():
    config = _tiny(algorithm="reptile_rl", iterations=6, reptile_epsilon=0.6)
    learner = build_learner(config, *build_components(config))
    assert learner.epsilon_at(0) == pytest.approx(0.6)
    assert learner.epsilon_at(3) == pytest.approx(0.3)
    constant = _tiny(algorithm="reptile_rl", reptile_epsilon=0.6, reptile_epsilon_final=0.6)
    assert build_learner(constant, *build_components(constant)).epsilon_at(2) == 0.6


# ---------------------------------------------------------------- joint policy gradient


def test_joint_policy_gradient_takes_one_plain_policy_gradient_step_on_the_tasks():
    config = _tiny(algorithm="joint_pg", outer_optimizer="sgd", outer_lr=0.05)
    env, policy, baseline = build_components(config, dtype=DOUBLE)
    learner = build_learner(config, env, policy, baseline)
    assert isinstance(learner, JointPolicyGradient)
    tasks = env.sample_tasks(3, torch.Generator().manual_seed(1))
    buffer, _, _ = sample_adaptation(
        env, policy, tasks, 4, 0, 0.1, [], baseline, 0.99, 1.0, torch.Generator().manual_seed(2)
    )
    assert buffer.pre_adaptation == []  # no inner step: one batch, with the current policy
    parameters = dict(policy.named_parameters())
    loss = policy_gradient_losses(
        policy, stack_parameters(parameters, 3), buffer.post_adaptation
    ).mean()
    gradients = torch.autograd.grad(loss, list(parameters.values()))
    expected = {
        name: (value - 0.05 * gradient).detach()
        for (name, value), gradient in zip(parameters.items(), gradients, strict=True)
    }
    metrics = learner.meta_step(tasks, torch.Generator().manual_seed(2), iteration=0)
    for name, parameter in policy.named_parameters():
        assert torch.allclose(parameter, expected[name], atol=1e-12), name
    assert metrics["policy_loss"] == pytest.approx(float(loss.detach()))
    returns = float(buffer.post_adaptation.trajectories.episode_returns().mean())
    assert metrics["pre_adaptation_return"] == metrics["post_adaptation_return"] == returns


def test_joint_policy_gradient_trains_and_is_evaluated_with_adaptation_like_the_others():
    config = _tiny(algorithm="joint_pg", eval_adaptation_steps=[1, 2])
    agent, history = train_rl(config, progress=False)
    assert len(history) == 3 and trained_adaptation_steps(config) == 0
    result = evaluate_rl(config, agent)
    assert [row["adaptation_steps"] for row in result["results"]] == [0, 1, 2]
    before, after = result["results"][0], result["results"][1]
    assert before["mean_return"] != after["mean_return"]  # it adapts at evaluation
    with pytest.raises(ValidationError, match="inner_estimator"):
        RLExperimentConfig(algorithm="joint_pg", inner_estimator="dice")


def test_joint_policy_gradient_resumes_to_the_same_weights_as_an_uninterrupted_run():
    config = _tiny(algorithm="joint_pg", iterations=3)
    uninterrupted, _ = train_rl(config, progress=False)
    states = []
    train_rl(
        config,
        on_checkpoint=lambda _, state: states.append(state),
        checkpoint_every=2,
        progress=False,
    )
    resumed, _ = train_rl(config, state=states[0], progress=False)
    for name, value in uninterrupted["policy"].items():
        assert torch.equal(value, resumed["policy"][name]), name


# ---------------------------------------------------------------- seeds


def test_every_training_seed_is_evaluated_on_the_same_tasks_and_random_numbers():
    first, second = _tiny(seed=0), _tiny(seed=1)
    agent = RLTrainer(first).agent_state()
    # The same policy under two training seeds: identical results only if the tasks and
    # the sampling come from eval_seed, not from the training seed.
    assert evaluate_rl(first, agent)["results"] == evaluate_rl(second, agent)["results"]
    assert (
        evaluate_rl(_tiny(seed=0, eval_seed=1), agent)["results"]
        != (evaluate_rl(first, agent)["results"])
    )
    # ... while the random initialisation is the training seed's.
    references = [evaluate_rl(c, agent)["references"]["random_init"] for c in (first, second)]
    assert references[0]["results"] != references[1]["results"]


def test_stage_seed_overrides_only_an_unset_seed():
    config = RLExperimentConfig()
    assert with_seed(config, "nav", None) is config
    assert with_seed(config, "nav", 2).seed == 2
    with pytest.raises(ValueError, match=r"rl_experiments\.nav\.seed = 5: .*remove the key"):
        with_seed(RLExperimentConfig(seed=5), "nav", 2)
    with pytest.raises(ValidationError):
        with_seed(config, "nav", -1)
    assert run_name("nav", 2) == "nav-s2" and run_name("nav", None) == "nav"
    assert dvc_stage_key("nav", 2) == "nav-2" and dvc_stage_key("nav", None) == "nav"


def test_default_pipeline_trains_every_rl_experiment_with_at_least_three_seeds():
    from dvc.repo import Repo

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    seeds = dvc["train_rl"]["matrix"]["seed"]
    assert len(set(seeds)) >= 3 and dvc["evaluate_rl"]["matrix"]["seed"] == seeds
    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["rl_experiments"]
    with Repo(str(ROOT)) as repo:
        stages = {stage.addressing: stage for stage in repo.index.stages}
    for name in experiments:
        assert "seed" not in experiments[name], name  # the matrix sets it
        for seed in seeds:
            for kind in ("train_rl", "evaluate_rl"):
                stage = stages[f"{kind}@{dvc_stage_key(name, seed)}"]
                assert stage.cmd.endswith(f" {name} --seed {seed}")
            outputs = {str(out.def_path) for out in stages[f"train_rl@{name}-{seed}"].outs}
            assert f"models/rl/{run_name(name, seed)}.pt" in outputs
            evaluated = {str(out.def_path) for out in stages[f"evaluate_rl@{name}-{seed}"].outs}
            assert f"metrics/eval_rl/{run_name(name, seed)}.json" in evaluated


def test_default_rl_experiments_include_the_mlp_critic_and_a_pretrained_reference_per_env():
    experiments = {
        name: RLExperimentConfig(**entry)
        for name, entry in yaml.safe_load((ROOT / "params.yaml").read_text())[
            "rl_experiments"
        ].items()
    }
    assert any(c.baseline == "mlp" and c.algorithm == "maml_rl" for c in experiments.values())
    learners = {c.env: c for c in experiments.values() if c.algorithm != "joint_pg"}
    pretrained = {c.env: c for c in experiments.values() if c.algorithm == "joint_pg"}
    assert set(pretrained) == set(learners)
    for env, reference in pretrained.items():  # adapted at evaluation like the learners
        assert reference.inner_lr == learners[env].inner_lr, env
    reptile = [c for c in experiments.values() if c.algorithm == "reptile_rl"]
    assert reptile and all(c.reptile_epsilon_final == 0.0 for c in reptile)
