"""CAVIA: context-only inner loop, second-order meta-gradient, FiLM network, training."""

from __future__ import annotations

from functools import partial

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
from metalab.algorithms.cavia import CAVIALearner, Options, build
from metalab.data.episodes import Episodes
from metalab.models import ModelConfig
from metalab.models.context_conv4 import ContextConv4

IMAGE_SIZE = 14
N_WAY = 3


def make_learner(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    image_size: int = IMAGE_SIZE,
    hidden: int = 8,
    num_context_params: int = 6,
    **options,
) -> CAVIALearner:
    torch.manual_seed(seed)
    model = ContextConv4(
        N_WAY,
        image_size,
        hidden=hidden,
        downsample="stride",
        num_context_params=num_context_params,
        film_block=options.get("film_block", 2),
    ).to(dtype)
    return CAVIALearner(model, Options(num_context_params=num_context_params, **options))


def make_episodes(num_tasks: int, seed: int = 1, k_shot: int = 2, q_query: int = 3) -> Episodes:
    generator = torch.Generator().manual_seed(seed)
    return stream_episodes(
        half_ink_patterns(6, seed, IMAGE_SIZE), num_tasks, N_WAY, k_shot, q_query, generator
    )


def test_forward_shapes_on_n_way_k_shot():
    torch.manual_seed(0)
    for downsample, image_size in [("maxpool", 28), ("stride", 28), ("stride", 14)]:
        model = ContextConv4(
            5, image_size, hidden=8, downsample=downsample, num_context_params=10, film_block=0
        )
        support_x = torch.rand(5 * 2, 1, image_size, image_size)  # 5-way 2-shot
        context = model.initial_context()
        assert context.shape == (10,) and torch.equal(context, torch.zeros(10))
        assert model.features(support_x, context).shape == (10, model.feature_dim)
        assert model(support_x, context).shape == (10, 5)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"body", "head"}
    assert "body.film.weight" in dict(model.named_parameters())


def test_zero_context_leaves_the_network_unmodulated_and_context_changes_it():
    torch.manual_seed(0)
    model = ContextConv4(N_WAY, IMAGE_SIZE, hidden=8, downsample="stride", num_context_params=4)
    x = torch.rand(6, 1, IMAGE_SIZE, IMAGE_SIZE)
    h = x
    for block in model.body.blocks:  # the same blocks without any FiLM
        h = block(h)
    expected = model.head(h.flatten(1))
    torch.testing.assert_close(model(x, model.initial_context()), expected)
    assert not torch.allclose(model(x, torch.ones(4)), expected)


def test_inner_loop_changes_only_the_context():
    learner = make_learner(inner_lr=1.0)
    episodes = make_episodes(num_tasks=2)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    context = learner.adapt_context(
        episodes.support_x[0], episodes.support_y[0], steps=3, create_graph=False
    )
    assert context.shape == (6,) and context.abs().max() > 0
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    predictor = learner.adapt(episodes.support_x[1], episodes.support_y[1], steps=3)
    predictor(episodes.query_x[1])
    for name, p in learner.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is not None  # the meta-gradient reaches every network weight


def test_context_starts_at_zero_for_every_task():
    learner = make_learner(inner_lr=1.0)
    episodes = make_episodes(num_tasks=2)
    task_a = (episodes.support_x[0], episodes.support_y[0])
    task_b = (episodes.support_x[1], episodes.support_y[1])
    assert torch.equal(learner.adapt_context(*task_a, steps=0, create_graph=False), torch.zeros(6))
    learner.adapt_context(*task_a, steps=2, create_graph=False)
    after_a = learner.adapt_context(*task_b, steps=2, create_graph=False)
    # By hand: two plain gradient steps on task B's context from zeros.
    context = torch.zeros(6, requires_grad=True)
    for _ in range(2):
        loss = F.cross_entropy(learner.model(task_b[0], context), task_b[1])
        (gradient,) = torch.autograd.grad(loss, context)
        context = (context - 1.0 * gradient).detach().requires_grad_(True)
    torch.testing.assert_close(after_a, context.detach(), rtol=0, atol=0)


def mean_query_loss(learner: CAVIALearner, episodes: Episodes) -> torch.Tensor:
    """The meta-loss written out with the public pieces: adapt the context, score queries."""
    losses = []
    for t in range(episodes.num_tasks):
        context = learner.adapt_context(
            episodes.support_x[t], episodes.support_y[t], learner.options.inner_steps, True
        )
        logits = learner.logits(episodes.query_x[t], context, episodes.n_way)
        losses.append(F.cross_entropy(logits, episodes.query_y[t]))
    return torch.stack(losses).mean()


def test_second_order_meta_gradient_matches_finite_differences():
    # A float64 network small enough for finite differences, and its first-order twin.
    make_small_learner = partial(
        make_learner,
        dtype=torch.float64,
        image_size=8,
        hidden=4,
        num_context_params=3,
        inner_lr=0.5,
        inner_steps=2,
    )
    learner = make_small_learner()
    generator = torch.Generator().manual_seed(3)
    episodes = as_float64(
        stream_episodes(half_ink_patterns(5, 3, image_size=8), 2, N_WAY, 2, 2, generator)
    )
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert stats.loss == pytest.approx(mean_query_loss(learner, episodes).item(), rel=1e-12)

    first_order = make_small_learner(first_order=True)
    first_order.meta_gradients(episodes, TrainProgress(0, 1))

    pick = torch.Generator().manual_seed(0)
    step = 1e-6
    checked_second_order_effect = False
    for name in [
        "body.blocks.0.conv.weight",
        "body.blocks.2.norm.weight",
        "body.film.weight",
        "body.film.bias",
        "head.weight",
    ]:
        p = dict(learner.model.named_parameters())[name]
        for _ in range(2):
            index = int(torch.randint(p.numel(), (1,), generator=pick))
            flat = p.data.view(-1)
            original = flat[index].item()
            with torch.no_grad():
                flat[index] = original + step
                plus = mean_query_loss(learner, episodes).item()
                flat[index] = original - step
                minus = mean_query_loss(learner, episodes).item()
                flat[index] = original
            numeric = (plus - minus) / (2 * step)
            analytic = p.grad.view(-1)[index].item()
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)
            approximate = (
                dict(first_order.model.named_parameters())[name].grad.view(-1)[index].item()
            )
            if abs(approximate - numeric) > 1e-4 * max(abs(numeric), 1e-3):
                checked_second_order_effect = True
    # The check distinguishes second-order from first-order CAVIA.
    assert checked_second_order_effect


def test_meta_training_lowers_the_adapted_query_loss():
    patterns = half_ink_patterns(8, seed=5, image_size=IMAGE_SIZE)
    # FiLM on the last block lets this 8-channel net re-map its features within 25 steps.
    learner = make_learner(
        seed=0,
        num_context_params=20,
        film_block=3,
        inner_lr=1.0,
        inner_steps=2,
        test_inner_steps=2,
    )
    optimizer = torch.optim.Adam(learner.parameter_groups(), lr=0.03)
    before, after = held_out_losses_around_streamed_training(
        learner, optimizer, patterns, N_WAY, 25
    )
    assert after < 0.75 * before, (before, after)


def test_adapt_returns_query_logits_and_handles_way_counts():
    learner = make_learner(inner_lr=1.0)
    episodes = make_episodes(num_tasks=1, q_query=5)
    with torch.no_grad():  # adapt must still differentiate with respect to the context
        logits = learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert logits.shape == (15, N_WAY)
    two_way = episodes.support_y[0] < 2
    predictor = learner.adapt(episodes.support_x[0][two_way], episodes.support_y[0][two_way])
    assert predictor(episodes.query_x[0]).shape == (15, 2)
    generator = torch.Generator().manual_seed(0)
    five_way = stream_episodes(half_ink_patterns(6, 0, IMAGE_SIZE), 1, 5, 1, 1, generator)
    with pytest.raises(ValueError, match="trained 3-way"):
        learner.adapt(five_way.support_x[0], five_way.support_y[0])


def test_deterministic_given_the_torch_seed():
    episodes = make_episodes(num_tasks=2)
    gradients = []
    for _ in range(2):
        learner = make_learner(seed=4, inner_lr=1.0)
        learner.meta_gradients(episodes, TrainProgress(0, 1))
        gradients.append([p.grad.clone() for p in learner.parameters()])
    for a, b in zip(*gradients, strict=True):
        assert torch.equal(a, b)


def test_options_and_build():
    with pytest.raises(ValidationError):
        Options(context_size=3)
    with pytest.raises(ValidationError):
        Options(film_block=4)
    context = BuildContext(model=ModelConfig(hidden=8), n_way=5, image_size=28)
    learner = build(Options(num_context_params=100), context)
    assert learner.algorithm == "cavia"
    assert learner.model.num_context_params == 100 and learner.model.head.out_features == 5
    with pytest.raises(ValueError, match="conv4"):
        build(Options(), BuildContext(model=ModelConfig(name="resnet18"), n_way=5, image_size=28))
