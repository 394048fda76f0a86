"""Training loop, resumption, NaN guard, evaluation and config of the meta-RL track."""

import io
import math

import pytest
import torch
from pydantic import ValidationError

from metalab.rl import NonFiniteLossError, RLExperimentConfig, RLTrainer, evaluate_rl, train_rl
from metalab.rl.loop import evaluation_step_sizes, trained_adaptation_steps


def _tiny(**overrides) -> RLExperimentConfig:
    settings = dict(
        iterations=4,
        meta_batch_size=3,
        trajectories_per_task=4,
        horizon=10,
        hidden_size=8,
        eval_tasks=4,
        seed=7,
    )
    settings.update(overrides)
    return RLExperimentConfig(**settings)


def _weights(agent_state):
    return agent_state["policy"]


def _without_timing(history):
    return [{k: v for k, v in row.items() if k != "tasks_per_second"} for row in history]


@pytest.mark.parametrize("algorithm", ["maml_rl", "anil_rl", "reptile_rl"])
def test_training_is_deterministic_for_a_seed(algorithm):
    config = _tiny(algorithm=algorithm, iterations=2)
    first_state, first_history = train_rl(config, progress=False)
    second_state, second_history = train_rl(config, progress=False)
    for name, value in _weights(first_state).items():
        assert torch.equal(value, _weights(second_state)[name]), name
    assert _without_timing(first_history) == _without_timing(second_history)
    other_state, _ = train_rl(_tiny(algorithm=algorithm, iterations=2, seed=8), progress=False)
    assert not torch.equal(
        _weights(other_state)["head.mean.bias"], _weights(first_state)["head.mean.bias"]
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(algorithm="maml_rl"),
        dict(algorithm="anil_rl", baseline="mlp", critic_fit_steps=2, critic_hidden_size=8),
        dict(algorithm="reptile_rl", env="bernoulli_bandit", reptile_inner_steps=2),
    ],
)
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(overrides):
    config = _tiny(**overrides)
    uninterrupted, full_history = train_rl(config, progress=False)

    saved = {}

    class Interrupted(Exception):
        pass

    def save_then_stop(iterations_done, state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved["bytes"] = buffer.getvalue()
        raise Interrupted

    with pytest.raises(Interrupted):
        train_rl(config, progress=False, on_checkpoint=save_then_stop, checkpoint_every=2)
    state = torch.load(io.BytesIO(saved["bytes"]), weights_only=False)
    assert state["iteration"] == 2

    seen = []
    resumed, resumed_history = train_rl(
        config, on_iteration=lambda i, m: seen.append(i), state=state, progress=False
    )
    assert seen == [2, 3]
    for name, value in _weights(uninterrupted).items():
        assert torch.equal(value, _weights(resumed)[name]), name
    assert _without_timing(resumed_history) == _without_timing(full_history)
    if config.baseline == "mlp":
        for name, value in uninterrupted["baseline"]["critic"].items():
            assert torch.equal(value, resumed["baseline"]["critic"][name]), name


def test_resuming_with_a_different_seed_is_refused():
    trainer = RLTrainer(_tiny())
    trainer.run_iteration()
    with pytest.raises(ValueError, match="seed"):
        RLTrainer(_tiny(seed=8)).load_state_dict(trainer.state_dict())


@pytest.mark.parametrize("algorithm", ["maml_rl", "reptile_rl"])
def test_non_finite_loss_names_the_iteration_and_leaves_weights_alone(algorithm):
    trainer = RLTrainer(_tiny(algorithm=algorithm))
    trainer.run_iteration()
    trainer.run_iteration()
    with torch.no_grad():
        trainer.policy.head.log_std.fill_(float("nan"))
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="iteration 2"):
        trainer.run_iteration()
    for name, value in trainer.policy.state_dict().items():
        assert torch.equal(value, before[name]) or torch.isnan(value).all(), name
    assert trainer.policy.body[0].weight.equal(before["body.0.weight"])


def test_evaluation_reports_returns_with_a_95_percent_interval():
    config = _tiny(eval_adaptation_steps=[1, 3])
    agent_state = RLTrainer(config).agent_state()
    report = evaluate_rl(config, agent_state)
    assert [row["adaptation_steps"] for row in report["results"]] == [0, 1, 3]
    for row in report["results"]:
        returns = torch.tensor(row["per_task_returns"])
        assert len(returns) == config.eval_tasks
        assert row["mean_return"] == pytest.approx(float(returns.mean()))
        expected_ci = 1.96 * float(returns.std()) / math.sqrt(len(returns))
        assert row["ci95"] == pytest.approx(expected_ci)
    metrics = report["metrics"]
    assert metrics["adaptation_gain_3_steps"] == pytest.approx(
        metrics["return_after_3_steps"] - metrics["return_pre_adaptation"]
    )
    # Same held-out tasks and sampling stream every time.
    assert evaluate_rl(config, agent_state)["metrics"] == metrics


def test_a_short_maml_run_raises_post_adaptation_return_on_navigation():
    config = RLExperimentConfig(
        iterations=12,
        meta_batch_size=8,
        trajectories_per_task=10,
        horizon=100,
        outer_lr=3e-3,
        eval_tasks=10,
        eval_adaptation_steps=[1],
        seed=0,
    )
    untrained = evaluate_rl(config, RLTrainer(config).agent_state())["metrics"]
    agent_state, history = train_rl(config, progress=False)
    trained = evaluate_rl(config, agent_state)["metrics"]
    assert len(history) == 12
    assert trained["return_after_1_steps"] > untrained["return_after_1_steps"] + 10.0
    assert trained["return_after_1_steps"] > trained["return_pre_adaptation"]


def test_config_rejects_unknown_keys_and_bad_evaluation_steps():
    with pytest.raises(ValidationError):
        RLExperimentConfig(learning_rate=0.1)
    with pytest.raises(ValidationError):
        RLExperimentConfig(eval_adaptation_steps=[2, 1])
    with pytest.raises(ValidationError):
        RLExperimentConfig(gamma=1.5)
    assert RLExperimentConfig().eval_adaptation_steps == [1, 2, 3]


def test_evaluation_halves_the_step_after_the_first_unless_constant():
    halved = RLExperimentConfig(inner_lr=0.1)
    assert evaluation_step_sizes(halved, 3) == [0.1, 0.05, 0.05]
    constant = RLExperimentConfig(inner_lr=0.1, eval_step_schedule="constant")
    assert evaluation_step_sizes(constant, 3) == [0.1, 0.1, 0.1]
    assert trained_adaptation_steps(RLExperimentConfig(inner_steps=2)) == 2
    reptile = RLExperimentConfig(algorithm="reptile_rl", reptile_inner_steps=4)
    assert trained_adaptation_steps(reptile) == 4
    with pytest.raises(ValidationError, match="eval_step_schedule"):
        RLExperimentConfig(eval_step_schedule="linear")
