"""ANIL with a task encoder (``anil_task_encoder``, the seed project's "TAML"): folded FiLM,
meta-gradients against finite differences, ANIL at initialisation, shapes and any way
count, a head-only inner loop, parameter groups, training progress, determinism, options
and model files."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from synthetic import (
    as_float64,
    build_context,
    central_differences,
    class_patterns,
    held_out_losses_around_training,
    meta_train,
    sample_episodes,
)
from test_learner_api import task, trainer_like_payload

from metalab.algorithms import anil_task_encoder, taml
from metalab.algorithms.anil_task_encoder import (
    AnilTaskEncoderLearner,
    Options,
    TaskModulation,
    modulated_logits,
)
from metalab.algorithms.base import TrainProgress
from metalab.algorithms.functional import linear_per_task
from metalab.algorithms.maml import MAMLLearner
from metalab.algorithms.maml import Options as MAMLOptions
from metalab.learner_api import learner_from_payload


def build(n_way: int = 5, seed: int = 0, **options) -> AnilTaskEncoderLearner:
    """The learner on the small synthetic Conv4 (8 channels, 16x16 images)."""
    torch.manual_seed(seed)
    options.setdefault("inner_lr", 0.4)
    return anil_task_encoder.build(Options(**options), build_context(n_way=n_way))


def small_episodes(num_tasks: int = 3, n_way: int = 3, queries: int = 2, seed: int = 2):
    return sample_episodes(class_patterns(24, seed=1), num_tasks, n_way, 1, queries, seed=seed)


# ------------------------------------------------------------------ the learner
def test_folded_film_equals_modulating_the_features():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 7, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    scale = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    shift = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    modulation = TaskModulation(scale, shift, torch.ones(2, 6), torch.ones(2, 1))
    folded = modulated_logits(features, {"head.weight": weight, "head.bias": bias}, modulation)
    direct = linear_per_task(features * scale.unsqueeze(1) + shift.unsqueeze(1), weight, bias)
    torch.testing.assert_close(folded, direct, rtol=1e-12, atol=1e-12)


CHECKED_PARAMETERS = (
    "body.0.0.weight",
    "body.2.1.weight",
    "head.weight",
    "head.bias",
    "task_encoder.encoder.0.weight",
    "task_encoder.decoder.weight",
)


def test_second_order_meta_gradient_matches_central_differences():
    learner = build(n_way=3, inner_lr=0.3, inner_steps=2).double()
    with torch.no_grad():  # leave the zero start, so that every encoder part matters
        learner.task_encoder.decoder.weight.normal_(0, 0.3)
        learner.task_encoder.decoder.bias.normal_(0, 0.3)
    episodes = as_float64(small_episodes())
    learner.zero_grad(set_to_none=True)
    learner.meta_gradients(episodes, TrainProgress(0, 10))
    # Cloned now: every finite-difference evaluation accumulates into .grad again.
    grads = {name: p.grad.clone() for name, p in learner.named_meta_parameters()}
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for name, parameter in learner.named_meta_parameters():
        if name not in CHECKED_PARAMETERS:
            continue
        indices = torch.randint(parameter.numel(), (2,), generator=generator)
        analytic = grads[name].view(-1)[indices]

        def meta_loss() -> torch.Tensor:
            stats = learner.meta_gradients(episodes, TrainProgress(0, 10))
            return torch.tensor(stats.extra["meta_loss"], dtype=torch.float64)

        numeric = central_differences(meta_loss, parameter, indices)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8, msg=name)
        checked += 1
    assert checked == len(CHECKED_PARAMETERS)


@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_starts_exactly_as_anil(vectorise: bool):
    # Zero decoder: scale 1, shift 0, lr multipliers 1, and no gradient into the body
    # through the encoder, so meta-loss and model gradients are ANIL's.
    learner = build(n_way=3, inner_steps=2, vectorise_tasks=vectorise).double()
    anil = MAMLLearner(
        copy.deepcopy(learner.model),
        3,
        MAMLOptions(
            inner_lr=0.4, inner_steps=2, adapt_parameters="head", vectorise_tasks=vectorise
        ),
    )
    episodes = as_float64(small_episodes())
    ours = learner.meta_gradients(episodes, TrainProgress(0, 10))
    reference = anil.meta_gradients(episodes, TrainProgress(0, 10))
    assert ours.extra["meta_loss"] == pytest.approx(reference.extra["meta_loss"], rel=1e-12)
    for (name, parameter), reference_parameter in zip(
        learner.model.named_parameters(), anil.model.parameters(), strict=True
    ):
        torch.testing.assert_close(parameter.grad, reference_parameter.grad, msg=name)
    assert learner.task_encoder.decoder.weight.grad.abs().sum() > 0  # it does learn


def test_shapes_on_five_way_one_shot_and_twenty_way_tasks():
    learner = build()
    five_way = sample_episodes(class_patterns(24, seed=1), 2, 5, 1, 15, seed=2)
    stats = learner.meta_gradients(five_way, TrainProgress(0, 1))
    assert math.isfinite(stats.loss) and 0 <= stats.accuracy <= 1
    for name, parameter in learner.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    logits = learner.adapt(five_way.support_x[0], five_way.support_y[0])(five_way.query_x[0])
    assert logits.shape == (75, 5)
    # A 20-way task for the 5-way learner: a fresh zero head, adapted at the encoded rates.
    twenty_way = sample_episodes(class_patterns(24, seed=1), 1, 20, 1, 2, seed=3)
    predictor = learner.adapt(twenty_way.support_x[0], twenty_way.support_y[0], steps=2)
    logits = predictor(twenty_way.query_x[0])
    assert logits.shape == (40, 20) and torch.isfinite(logits).all()
    assert learner.model.head.weight.shape == (5, learner.model.head.in_features)
    # And a learner trained 20-way.
    twenty = build(n_way=20)
    stats = twenty.meta_gradients(twenty_way, TrainProgress(0, 1))
    assert math.isfinite(stats.loss)


def test_inner_loop_changes_only_the_head(monkeypatch):
    trajectories = []
    original = anil_task_encoder.inner_loop

    def recording_inner_loop(*args, **kwargs):
        trajectories.append(original(*args, **kwargs))
        return trajectories[-1]

    monkeypatch.setattr(anil_task_encoder, "inner_loop", recording_inner_loop)
    learner = build(n_way=3, inner_steps=2)
    episodes = small_episodes()
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    learner.zero_grad(set_to_none=True)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=3)(episodes.query_x[0])
    # Two chunks of tasks (task_chunk_size 2) with 2 steps each, then adapt with 3 steps.
    assert [len(trajectory) for trajectory in trajectories] == [3, 3, 4]
    for trajectory in trajectories:
        assert all(set(params) == {"head.weight", "head.bias"} for params in trajectory)
        assert not torch.equal(trajectory[-1]["head.weight"], trajectory[0]["head.weight"])
    for name, parameter in learner.named_parameters():  # adapt moves no meta-parameter
        assert torch.equal(parameter, before[name]) and parameter.grad is None, name


def test_parameter_groups_include_the_task_encoder():
    learner = build(outer_trainable="head")
    groups = {group["name"]: group for group in learner.parameter_groups()}
    assert set(groups) == {"head x1", "task_encoder x1"}
    names = set(groups["task_encoder x1"]["parameter_names"])
    assert {f"task_encoder.{n}" for n, _ in learner.task_encoder.named_parameters()} == names


# ----------------------------------------------------------------- training runs
def test_a_few_dozen_meta_steps_reduce_the_held_out_loss():
    learner = build(seed=0, head_init="zeros")
    before, after, losses = held_out_losses_around_training(learner, steps=30)
    assert after < 0.6 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_same_seed_gives_identical_parameters():
    states = []
    for _ in range(2):
        learner = build(seed=5, task_dropout_rates=[0.1, 0.1, 0.1, 0.1])
        meta_train(learner, class_patterns(12, seed=3), steps=3, seed=0)
        states.append(learner.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.filterwarnings("ignore:precision bf16")  # emulated-bf16 CPUs warn
def test_bf16_meta_gradients_are_finite():
    torch.manual_seed(0)
    learner = anil_task_encoder.build(Options(), build_context(precision="bf16"))
    stats = learner.meta_gradients(small_episodes(n_way=5), TrainProgress(0, 1))
    assert math.isfinite(stats.extra["meta_loss"])
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.grad is not None)


# ------------------------------------------------------------- options and files
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adapt_parameters": "all"}, "adapt_parameters must be head"),
        ({"inner_lr_mode": "per_parameter"}, "inner_lr_mode must be fixed"),
        ({"zero_head": True}, "zero_head is not available for anil_task_encoder"),
        ({"learned_noise": True}, "learned_noise: not for anil_task_encoder"),
        ({"variant": "encoder"}, "Extra inputs are not permitted"),
        ({"encoder_width": 0}, "greater than or equal to 1"),
    ],
)
def test_options_reject_what_the_learner_cannot_do(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        Options(**options)


def test_options_default_to_head_only_and_round_trip():
    options = Options(encoder_width=16)
    assert options.adapt_parameters == "head" and options.inner_lr_mode == "fixed"
    assert Options.model_validate(options.model_dump()) == options
    assert isinstance(options, MAMLOptions)


def test_taml_has_no_encoder_variant_any_more():
    with pytest.raises(ValueError, match="'entropy' or 'inequality'"):
        taml.Options(variant="encoder")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        taml.Options(encoder_width=8)


def test_model_file_round_trip_and_other_way_counts():
    payload, original = trainer_like_payload("anil_task_encoder", {"test_inner_steps": 2})
    learner = learner_from_payload(payload)
    assert type(learner.meta_learner) is AnilTaskEncoderLearner is type(original)
    assert learner.algorithm == "anil_task_encoder"
    assert learner.adapts_by_gradient and learner.default_adaptation_steps == 2
    support_x, support_y, query_x = task(5)
    expected = original.eval().adapt(support_x, support_y)(query_x)
    torch.testing.assert_close(learner.adapt(support_x, support_y).predict(query_x), expected)
    support_x, support_y, query_x = task(3, k_shot=1, queries=4)
    assert learner.adapt(support_x, support_y).predict(query_x).shape == (12, 3)
