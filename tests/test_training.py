"""The shared train loop: resume equals an uninterrupted run, NaN guard, schedules."""

import math

import pytest
import torch

from metalab.algorithms.base import StepStats, scheduled_lr
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.errors import DivergedError
from metalab.params import TrainConfig, validate_params
from metalab.training import Trainer, base_lr_at


def tiny_params(**train):
    settings = dict(
        n_way=3,
        k_shot=1,
        query_per_class=2,
        meta_batch_size=2,
        iterations=6,
        threads=1,
        validate_every=3,
        validation_episodes=4,
        checkpoint_every=2,
        log_every=1,
    )
    settings.update(train)
    return validate_params(
        {
            "data": {"split": {"validation_characters": 5}},
            "train": settings,
            "experiments": {
                "proto": {
                    "algorithm": "protonets",
                    "model": {"hidden": 8},
                    # Task dropout draws from the global RNG: resume must restore it.
                    "options": {"task_dropout_rates": [0.1, 0.1, 0.1, 0.1]},
                }
            },
        }
    )


@pytest.fixture
def data(tiny_prefetched_28):
    arrays = load_prefetched(tiny_prefetched_28)
    params = tiny_params()
    return arrays, make_split(arrays.character_origin, params.data.split)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_with_the_same_weights(data, tmp_path):
    arrays, split = data
    params = tiny_params()
    straight = Trainer("proto", params, arrays, split, tmp_path / "a", progress=False)
    straight.run()

    def kill_at_five(metrics, step):
        if step == 5:
            raise Interrupt

    interrupted = Trainer(
        "proto", params, arrays, split, tmp_path / "b", progress=False, on_log=kill_at_five
    )
    with pytest.raises(Interrupt):
        interrupted.run()
    torch.manual_seed(12345)  # a new process would start from another RNG state
    resumed = Trainer("proto", params, arrays, split, tmp_path / "b", progress=False)
    result = resumed.run()
    assert result.summary["iterations"] == 6
    for key, value in straight.learner.state_dict().items():
        assert torch.equal(value, resumed.learner.state_dict()[key]), key
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert straight.best_accuracy == resumed.best_accuracy


def test_checkpoint_of_another_configuration_is_not_resumed(data, tmp_path):
    arrays, split = data
    Trainer("proto", tiny_params(iterations=2), arrays, split, tmp_path, progress=False).run()
    other = Trainer(
        "proto", tiny_params(iterations=4, meta_lr=0.01), arrays, split, tmp_path, progress=False
    )
    assert not other.try_resume()
    assert other.iteration == 0


def test_nan_loss_stops_with_experiment_and_iteration_and_keeps_checkpoint(data, tmp_path):
    arrays, split = data
    trainer = Trainer("proto", tiny_params(), arrays, split, tmp_path, progress=False)
    real = trainer.learner.meta_gradients

    def diverge_at_three(episodes, progress):
        stats = real(episodes, progress)
        return StepStats(float("nan"), stats.accuracy) if progress.iteration == 3 else stats

    trainer.learner.meta_gradients = diverge_at_three
    with pytest.raises(
        DivergedError, match=r"experiment 'proto': non-finite meta-loss = nan at iteration 3"
    ):
        trainer.run()
    saved = torch.load(tmp_path / "proto.pt", weights_only=True)["state"]
    assert saved["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in saved["learner"].values() if v.is_floating_point())


def test_training_reduces_loss_and_summary_is_complete(data, tmp_path):
    arrays, split = data
    params = tiny_params(iterations=30, validate_every=10, meta_lr=0.005)
    trainer = Trainer("proto", params, arrays, split, tmp_path, progress=False)
    result = trainer.run()
    losses = [row["loss"] for row in result.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    summary = result.summary
    assert summary["trainable_parameters"] == summary["total_parameters"] > 0
    assert summary["tasks"] == 60 and summary["tasks_per_s"] > 0
    assert 0 <= summary["best_validation_accuracy"] <= 1
    assert trainer.model_payload().state_dict.keys() == trainer.learner.state_dict().keys()


def test_group_schedule_multiplier_and_warmup():
    assert scheduled_lr({"lr_multiplier": 0.5, "warmup_iterations": 10}, 0.002, 9) == 0.0
    assert scheduled_lr({"lr_multiplier": 0.5, "warmup_iterations": 10}, 0.002, 10) == 0.001
    assert scheduled_lr({}, 0.002, 0) == 0.002


def test_cosine_schedule_endpoints():
    config = TrainConfig(meta_lr=0.01, iterations=100, lr_schedule="cosine", min_lr_fraction=0.1)
    assert base_lr_at(config, 0) == pytest.approx(0.01)
    assert base_lr_at(config, 50) == pytest.approx(0.001 + 0.009 * 0.5)
    assert base_lr_at(config, 100) == pytest.approx(0.001)
    assert base_lr_at(TrainConfig(meta_lr=0.01), 77) == 0.01
    assert math.isclose(base_lr_at(config, 25), 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 4)))
