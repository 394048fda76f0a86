"""Reptile: the outer step, epsilon annealing, inner Adam, mini-batches, evaluation modes."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from synthetic import (
    as_float64,
    half_ink_patterns,
    held_out_losses_around_streamed_training,
    stream_episodes,
)

from metalab.algorithms.base import BuildContext, TrainProgress
from metalab.algorithms.functional import StackedOptimizer
from metalab.algorithms.reptile import Options, ReptileLearner, build, support_batches
from metalab.data.episodes import Episodes
from metalab.models import Conv4, ModelConfig

IMAGE_SIZE = 14
N_WAY = 3


def make_learner(seed: int = 0, dtype: torch.dtype = torch.float32, **options) -> ReptileLearner:
    torch.manual_seed(seed)
    model = Conv4(N_WAY, IMAGE_SIZE, hidden=8, downsample="stride").to(dtype)
    return ReptileLearner(model, Options(**options))


def episodes_64(num_tasks: int, k_shot: int = 2, q_query: int = 3, seed: int = 1) -> Episodes:
    generator = torch.Generator().manual_seed(seed)
    patterns = half_ink_patterns(6, seed, IMAGE_SIZE)
    return as_float64(stream_episodes(patterns, num_tasks, N_WAY, k_shot, q_query, generator))


def hand_fine_tune(
    model: Conv4,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    lr: float,
    adam: bool,
) -> dict[str, torch.Tensor]:
    """Full-batch fine-tuning written out by hand: SGD, or Adam with betas (0, 0.999) and
    fresh moments (m_t = g_t; v_t = 0.999 v_{t-1} + 0.001 g_t^2; bias-corrected v)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    second_moment = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(support_x), support_y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, v in zip(params, grads, second_moment, strict=True):
                if adam:
                    v.mul_(0.999).add_(0.001 * g * g)
                    v_hat = v / (1 - 0.999**step)
                    p.sub_(lr * g / (v_hat.sqrt() + 1e-8))
                else:
                    p.sub_(lr * g)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("inner_optimizer", "inner_lr"), [("sgd", 0.3), ("adam", 0.01)], ids=["sgd", "adam"]
)
def test_outer_step_is_epsilon_times_mean_of_fine_tuning_deltas(inner_optimizer, inner_lr):
    learner = make_learner(
        dtype=torch.float64,
        inner_optimizer=inner_optimizer,
        inner_lr=inner_lr,
        inner_steps=3,
        epsilon=0.7,
    )
    episodes = episodes_64(num_tasks=3)
    theta = {name: p.detach().clone() for name, p in learner.model.named_parameters()}
    # Every task fine-tuned from theta on its own (Adam moments start from zero each time).
    deltas = []
    for t in range(episodes.num_tasks):
        adapted = hand_fine_tune(
            learner.model,
            episodes.support_x[t],
            episodes.support_y[t],
            steps=3,
            lr=inner_lr,
            adam=inner_optimizer == "adam",
        )
        deltas.append({name: adapted[name] - theta[name] for name in theta})

    learner.zero_grad(set_to_none=True)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 10))
    optimizer = torch.optim.SGD(learner.parameter_groups(), lr=learner.outer_lr)
    assert learner.outer_optimizer == "sgd"
    optimizer.step()

    for name, p in learner.model.named_parameters():
        mean_delta = sum(delta[name] for delta in deltas) / len(deltas)
        if name.endswith("weight"):  # conv biases before BatchNorm get no gradient
            assert mean_delta.abs().max() > 1e-6, name  # the check below is not vacuous
        torch.testing.assert_close(
            p.detach(), theta[name] + 0.7 * mean_delta, rtol=1e-9, atol=1e-10
        )
    assert 0.0 < stats.accuracy <= 1.0 and stats.loss > 0.0
    assert stats.extra["epsilon"] == 0.7


def test_gradients_accumulate_into_existing_grad():
    learner = make_learner(dtype=torch.float64, inner_optimizer="sgd", inner_lr=0.3)
    episodes = episodes_64(num_tasks=2)
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    once = [p.grad.clone() for p in learner.parameters()]
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    for p, g in zip(learner.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_epsilon_annealing_is_linear_and_scales_the_gradient():
    learner = make_learner(
        dtype=torch.float64, inner_optimizer="sgd", inner_lr=0.3, epsilon=1.0, epsilon_final=0.2
    )
    assert learner.epsilon_at(TrainProgress(0, 100)) == pytest.approx(1.0)
    assert learner.epsilon_at(TrainProgress(25, 100)) == pytest.approx(0.8)
    assert learner.epsilon_at(TrainProgress(50, 100)) == pytest.approx(0.6)
    assert learner.epsilon_at(TrainProgress(100, 100)) == pytest.approx(0.2)
    constant = make_learner(epsilon=0.5)
    assert constant.epsilon_at(TrainProgress(99, 100)) == 0.5

    episodes = episodes_64(num_tasks=2)
    learner.meta_gradients(episodes, TrainProgress(0, 100))
    at_start = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad(set_to_none=True)
    stats = learner.meta_gradients(episodes, TrainProgress(50, 100))
    assert stats.extra["epsilon"] == pytest.approx(0.6)
    for p, g in zip(learner.parameters(), at_start, strict=True):
        torch.testing.assert_close(p.grad, 0.6 * g)


def test_inner_adam_state_does_not_leak_across_tasks():
    episodes = episodes_64(num_tasks=2)
    task_a, task_b = (
        (episodes.support_x[0], episodes.support_y[0]),
        (
            episodes.support_x[1],
            episodes.support_y[1],
        ),
    )
    learner = make_learner(dtype=torch.float64, inner_optimizer="adam", inner_lr=0.01)
    learner.fine_tune(*task_a, steps=4, batch_size=None)
    after_a, _ = learner.fine_tune(*task_b, steps=4, batch_size=None)
    fresh = make_learner(dtype=torch.float64, inner_optimizer="adam", inner_lr=0.01)
    alone, _ = fresh.fine_tune(*task_b, steps=4, batch_size=None)
    for name in alone:
        torch.testing.assert_close(after_a[name], alone[name], rtol=0, atol=0)


def test_support_batches_cycle_through_reshuffled_passes():
    torch.manual_seed(3)
    batches = support_batches(num_support=6, batch_size=4, steps=3)
    indices = torch.cat(batches)
    assert [b.shape for b in batches] == [torch.Size([4])] * 3
    # 12 indices = two full passes over the 6 support examples.
    assert sorted(indices[:6].tolist()) == list(range(6))
    assert sorted(indices[6:].tolist()) == list(range(6))
    assert support_batches(num_support=6, batch_size=None, steps=2) == [None, None]
    assert support_batches(num_support=6, batch_size=6, steps=1) == [None]
    # No steps (evaluation's "before adaptation"): no batches and no random numbers drawn.
    state = torch.get_rng_state()
    assert support_batches(num_support=6, batch_size=4, steps=0) == []
    assert torch.equal(torch.get_rng_state(), state)


def run_iterations(seed: int, iterations: int = 2) -> tuple[list[torch.Tensor], list[float]]:
    learner = make_learner(seed=0, inner_optimizer="adam", inner_lr=0.01, inner_batch_size=4)
    episodes = stream_episodes(
        half_ink_patterns(6, 0, IMAGE_SIZE), 2, N_WAY, 3, 2, torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.SGD(learner.parameter_groups(), lr=learner.outer_lr)
    torch.manual_seed(seed)
    losses = []
    for iteration in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        losses.append(learner.meta_gradients(episodes, TrainProgress(iteration, iterations)).loss)
        optimizer.step()
    return [p.detach().clone() for p in learner.parameters()], losses


def test_deterministic_given_the_torch_seed():
    params_1, losses_1 = run_iterations(seed=7)
    params_2, losses_2 = run_iterations(seed=7)
    params_3, _ = run_iterations(seed=8)
    assert losses_1 == losses_2
    for a, b in zip(params_1, params_2, strict=True):
        assert torch.equal(a, b)
    # The mini-batches are drawn from the torch RNG: another seed gives other weights.
    assert any(not torch.equal(a, c) for a, c in zip(params_1, params_3, strict=True))


def test_meta_training_lowers_the_adapted_query_loss():
    patterns = half_ink_patterns(8, seed=5, image_size=IMAGE_SIZE)
    learner = make_learner(
        seed=0,
        inner_optimizer="adam",
        inner_lr=0.01,
        inner_steps=5,
        test_inner_steps=5,
        epsilon=1.0,
        epsilon_final=0.5,
    )
    optimizer = torch.optim.SGD(learner.parameter_groups(), lr=learner.outer_lr)
    torch.manual_seed(0)  # the inner mini-batches of held-out adaptation and of training
    before, after = held_out_losses_around_streamed_training(
        learner, optimizer, patterns, N_WAY, 20
    )
    assert after < 0.75 * before, (before, after)


def test_adapt_to_an_unseen_way_count_starts_from_a_zero_head():
    learner = make_learner(inner_optimizer="sgd", inner_lr=0.1)
    generator = torch.Generator().manual_seed(2)
    episodes = stream_episodes(half_ink_patterns(6, 2, IMAGE_SIZE), 1, 5, 1, 2, generator)
    support_x, support_y, query_x = (
        episodes.support_x[0],
        episodes.support_y[0],
        episodes.query_x[0],
    )
    untouched = learner.adapt(support_x, support_y, steps=0)(query_x)
    assert untouched.shape == (10, 5)
    assert torch.equal(untouched, torch.zeros(10, 5))
    tuned = learner.adapt(support_x, support_y, steps=2)(query_x)
    assert tuned.shape == (10, 5) and tuned.abs().max() > 0
    assert learner.model.head.out_features == N_WAY  # the meta-parameters keep their head

    random_head = make_learner(inner_optimizer="sgd", head_init="random")
    assert random_head.adapt(support_x, support_y, steps=0)(query_x).abs().max() > 0


def test_adapt_does_not_change_meta_parameters_and_works_under_no_grad():
    learner = make_learner(inner_optimizer="adam", inner_lr=0.01)
    before = [p.detach().clone() for p in learner.parameters()]
    episodes = stream_episodes(
        half_ink_patterns(6, 4, IMAGE_SIZE), 1, N_WAY, 2, 2, torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        logits = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=3)(
            episodes.query_x[0]
        )
    assert logits.shape == (6, N_WAY)
    for p, b in zip(learner.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_non_transductive_prediction_classifies_each_query_with_the_support_set_only():
    learner = make_learner(inner_optimizer="sgd", inner_lr=0.1, transductive_eval=False)
    transductive = make_learner(inner_optimizer="sgd", inner_lr=0.1, transductive_eval=True)
    generator = torch.Generator().manual_seed(6)
    patterns = half_ink_patterns(6, 6, IMAGE_SIZE)
    episodes = stream_episodes(patterns, 1, N_WAY, 2, 12, generator)  # 36 queries
    support_x, support_y, query_x = (
        episodes.support_x[0],
        episodes.support_y[0],
        episodes.query_x[0],
    )
    torch.manual_seed(0)
    logits = learner.adapt(support_x, support_y, steps=2)(query_x)
    adapted, _ = learner.fine_tune(support_x, support_y, steps=2, batch_size=None)
    model = copy.deepcopy(learner.model)
    model.load_state_dict(adapted)
    with torch.no_grad():
        expected = torch.stack([model(torch.cat([support_x, q[None]]))[-1] for q in query_x])
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        # The transductive predictor normalises with the query batch instead.
        assert not torch.allclose(transductive.adapt(support_x, support_y, 2)(query_x), expected)


def test_options_and_build():
    with pytest.raises(ValidationError):
        Options(inner_stepz=3)
    with pytest.raises(ValidationError):
        Options(inner_optimizer="rmsprop")
    with pytest.raises(ValidationError):
        Options(epsilon=0.0)
    context = BuildContext(model=ModelConfig(hidden=8), n_way=5, image_size=28)
    learner = build(Options(), context)
    assert learner.algorithm == "reptile" and learner.outer_lr == 1.0
    assert learner.model.head.out_features == 5
    assert all(name.startswith("model.") for name, _ in learner.named_parameters())


@pytest.mark.parametrize(
    ("kind", "betas"), [("adam", (0.0, 0.999)), ("adam", (0.9, 0.99)), ("sgd", (0.0, 0.999))]
)
def test_stacked_optimizer_moves_each_task_as_its_own_torch_optimizer(kind, betas):
    """Row t of the stacked weights follows a torch.optim optimizer of task t's own, bit for
    bit, over several steps with different gradients per task and step (Adam with Reptile's
    betas, and with momentum)."""
    generator = torch.Generator().manual_seed(0)
    start = {
        "w": torch.randn(3, 4, 2, generator=generator),
        "b": torch.randn(3, 5, generator=generator),
    }
    stacked = {name: p.clone() for name, p in start.items()}
    own = [{name: p[t].clone().requires_grad_(True) for name, p in start.items()} for t in range(3)]
    optimizers = [
        torch.optim.Adam(p.values(), lr=0.01, betas=betas)
        if kind == "adam"
        else torch.optim.SGD(p.values(), lr=0.01)
        for p in own
    ]
    stacked_optimizer = StackedOptimizer(kind, 0.01, betas=betas)
    for _ in range(4):
        grads = {name: torch.randn(p.shape, generator=generator) for name, p in start.items()}
        grads["b"][1] = 0.0  # a zero gradient: Adam must not move it (eps keeps it finite)
        stacked_optimizer.step(stacked, grads)
        for t, (params, optimizer) in enumerate(zip(own, optimizers, strict=True)):
            for name, p in params.items():
                p.grad = grads[name][t].clone()
            optimizer.step()
    for t, params in enumerate(own):
        for name, p in params.items():
            assert torch.equal(stacked[name][t], p.detach()), (kind, t, name)
    assert torch.equal(stacked["b"][1], start["b"][1])
    assert not torch.equal(stacked["w"], start["w"])
    with pytest.raises(ValueError, match="inner optimizer 'rmsprop': allowed 'adam', 'sgd'"):
        StackedOptimizer("rmsprop", 0.1)


@pytest.mark.parametrize("inner_optimizer", ["adam", "sgd"])
def test_fine_tuning_many_tasks_at_once_gives_each_task_its_own_fine_tuning(inner_optimizer):
    """`fine_tune_many` (the grouped forward, stacked weights) ends where `fine_tune` ends on
    each task (float64: up to summation order), for the trained and a new way count."""
    learner = make_learner(dtype=torch.float64, inner_optimizer=inner_optimizer, inner_lr=0.01)
    episodes = episodes_64(4)
    adapted = learner.fine_tune_many(episodes.support_x, episodes.support_y, 3, N_WAY)
    for t in range(4):
        expected, _ = learner.fine_tune(episodes.support_x[t], episodes.support_y[t], 3, None)
        for name, p in expected.items():
            # A convolution's bias before BatchNorm has gradient 0 up to rounding, which
            # Adam's normalisation magnifies (to ~1e-10 here); BatchNorm cancels it.
            conv_bias = re.fullmatch(r"body\.\d\.0\.bias", name) is not None
            atol = 1e-8 if conv_bias else 1e-10
            torch.testing.assert_close(adapted[name][t], p, rtol=0, atol=atol)
            if not conv_bias:
                assert not torch.equal(p, learner.model.get_parameter(name).detach()), name
    two_way = episodes.support_y.clamp(max=1)  # labels 0..1: a fresh zero 2-way head
    adapted = learner.fine_tune_many(episodes.support_x, two_way, 2, 2)
    expected, _ = learner.fine_tune(episodes.support_x[1], two_way[1], 2, None, n_way=2)
    assert adapted["head.weight"].shape == (4, 2, learner.model.head.in_features)
    torch.testing.assert_close(
        adapted["head.weight"][1], expected["head.weight"], rtol=0, atol=1e-10
    )


def test_batches_tasks_only_when_test_time_adaptation_draws_no_random_numbers():
    """Tasks are adapted together only with a Conv4, the whole support set per test-time
    step and a zero head for a new way count; then adapting (a new way count included)
    draws no random numbers, which the contract of `batches_tasks` asks. Meta-training
    mini-batches (inner_batch_size) do not reach test time."""
    assert make_learner().batches_tasks
    assert make_learner(inner_batch_size=2).batches_tasks
    assert make_learner(inner_batch_size=2).test_batch_size is None
    assert not make_learner(test_inner_batch_size=2).batches_tasks
    assert not make_learner(head_init="random").batches_tasks
    resnet = build(
        Options(),
        BuildContext(model=ModelConfig(name="resnet18"), n_way=N_WAY, image_size=IMAGE_SIZE),
    )
    assert not resnet.batches_tasks

    learner = make_learner(inner_lr=0.01)
    episodes = stream_episodes(
        half_ink_patterns(6, 2, IMAGE_SIZE), 2, 5, 1, 2, torch.Generator().manual_seed(2)
    )
    state = torch.get_rng_state()
    batched = learner.adapt_many(episodes.support_x, episodes.support_y, 2)(episodes.query_x)
    one = learner.adapt(episodes.support_x[1], episodes.support_y[1], 2)(episodes.query_x[1])
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(batched[1], one, rtol=0, atol=1e-4)
    assert batched.shape == (2, 10, 5) and batched.abs().max() > 0
