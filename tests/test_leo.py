"""LEO: latent encoding, decoding, the latent inner loop, regularisers, meta-gradients."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic import (
    as_float64,
    build_context,
    central_differences,
    class_patterns,
    held_out_losses_around_training,
    meta_train_from_torch_seed,
    sample_episodes,
)

from metalab.algorithms import leo
from metalab.algorithms.base import TrainProgress
from metalab.data.episodes import Episodes

SMALL = {"latent_dim": 8, "relation_hidden": 16}


def build(precision: str = "fp32", **options) -> leo.LatentEmbeddingOptimization:
    return leo.build(leo.Options(**(SMALL | options)), build_context(precision=precision))


def support_features(learner, episodes: Episodes) -> torch.Tensor:
    with torch.no_grad():
        return learner.embedding(episodes.support_x[0])


# -- regularisers ------------------------------------------------------------------------


def test_kl_term_by_hand():
    mean = torch.tensor([[0.5, -1.0]])
    std = torch.tensor([[1.0, 0.5]])
    # 0.5 (m^2 + s^2 - 1) - log s per element: 0.125 and 0.125 + log 2, then the mean.
    expected = (0.125 + 0.125 + math.log(2.0)) / 2
    assert leo.kl_to_standard_normal(mean, std).item() == pytest.approx(expected, rel=1e-6)
    assert leo.kl_to_standard_normal(torch.zeros(3, 4), torch.ones(3, 4)).item() == 0.0


def test_kl_term_agrees_with_torch_distributions():
    torch.manual_seed(0)
    mean, std = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6, dtype=torch.float64) + 0.1
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    ).mean()
    torch.testing.assert_close(leo.kl_to_standard_normal(mean, std), reference)


def test_orthogonality_penalty_zero_for_orthonormal_rows_and_by_hand_otherwise():
    torch.manual_seed(0)
    orthonormal_rows = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64))[0].T  # [8, 16]
    assert leo.orthogonality_penalty(orthonormal_rows).item() < 1e-20
    # Only the directions matter: orthogonal rows of any lengths also give zero.
    scaled = orthonormal_rows * torch.arange(1, 9, dtype=torch.float64)[:, None]
    assert leo.orthogonality_penalty(scaled).item() < 1e-20
    # Rows (1, 0) and (1, 1): off-diagonal correlation 1/sqrt(2); mean of squares 2 * 0.5 / 4.
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert leo.orthogonality_penalty(rows).item() == pytest.approx(0.25, rel=1e-6)


def test_orthogonality_penalty_reads_the_decoder_rows():
    learner = build()
    rows = learner.decoder_rows()
    assert rows.shape == (8, 2 * learner.embedding.feature_dim)
    with torch.no_grad():
        orthonormal = torch.linalg.qr(torch.randn(rows.shape[1], rows.shape[0]))[0].T
        learner.decoder.weight.copy_(orthonormal.T)
    assert leo.orthogonality_penalty(learner.decoder_rows()).item() < 1e-10


# -- shapes and the inner loop ---------------------------------------------------------


@pytest.mark.parametrize("n_way", [5, 7, 2])
def test_encoder_decoder_and_prediction_shapes_for_any_way_count(n_way):
    torch.manual_seed(0)
    learner = build()
    episodes = sample_episodes(class_patterns(12, seed=1), 1, n_way, 2, 3, seed=2)
    features = support_features(learner, episodes)
    mean, std = learner.encode(features, episodes.support_y[0], n_way)
    assert mean.shape == std.shape == (n_way, 8) and (std > 0).all()
    weight_mean, weight_std = learner.decode(mean)
    assert weight_mean.shape == weight_std.shape == (n_way, learner.embedding.feature_dim)
    assert (weight_std > 0).all()
    logits = learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert logits.shape == (3 * n_way, n_way)


def test_latent_inner_loop_moves_only_the_latent_codes():
    torch.manual_seed(0)
    learner = build()
    episodes = sample_episodes(class_patterns(12, seed=1), 1, 5, 1, 3, seed=2)
    features = support_features(learner, episodes)
    labels = episodes.support_y[0]
    latents, _ = learner.encode(features, labels, 5)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}

    adapted = learner.latent_inner_loop(features, labels, latents, 3, True, keep_graph=True)

    for name, parameter in learner.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None, name
    assert adapted.shape == latents.shape and not torch.equal(adapted, latents)
    assert adapted.requires_grad  # second order: differentiable w.r.t. the meta-parameters

    def support_loss(codes):
        return leo.linear_classifier_loss(learner.decode(codes)[0], features, labels).item()

    deterministic = learner.latent_inner_loop(features, labels, latents, 3, False, False)
    assert support_loss(deterministic) < support_loss(latents)


def test_adapt_steps_override_the_latent_steps_and_zero_means_no_adaptation():
    torch.manual_seed(0)
    learner = build(inner_steps=5, finetune_steps=3)
    assert learner.adapts_by_gradient and learner.default_adaptation_steps == 5
    episodes = sample_episodes(class_patterns(12, seed=1), 1, 5, 1, 3, seed=2)
    support_x, support_y, query_x = (
        episodes.support_x[0],
        episodes.support_y[0],
        episodes.query_x[0],
    )
    features = support_features(learner, episodes)
    with torch.no_grad():
        query = learner.embedding(query_x)
        latents = learner.encode(features, support_y, 5)[0]

    before = query @ learner.decode(latents)[0].T
    torch.testing.assert_close(learner.adapt(support_x, support_y, steps=0)(query_x), before)

    adapted_latents = learner.latent_inner_loop(features, support_y, latents, 2, False, False)
    weights = learner.finetune(features, support_y, learner.decode(adapted_latents)[0], 3, False)
    torch.testing.assert_close(
        learner.adapt(support_x, support_y, steps=2)(query_x), query @ weights.T
    )


def test_frozen_body_gets_no_gradient_and_the_rest_does():
    torch.manual_seed(0)
    learner = build(train_body=False)
    episodes = sample_episodes(class_patterns(12, seed=1), 2, 5, 1, 2, seed=2)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert set(stats.extra) >= {"kl", "orthogonality", "encoder_penalty", "inner_lr"}
    for name, parameter in learner.named_parameters():
        if name.startswith("embedding."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bf16_gives_finite_float32_logits_and_gradients():
    torch.manual_seed(0)
    learner = build(precision="bf16")
    episodes = sample_episodes(class_patterns(10, seed=1), 2, 5, 1, 2, seed=2)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert math.isfinite(stats.loss)
    for name, parameter in learner.named_parameters():
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    logits = learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert logits.dtype == torch.float32


# -- meta-gradients ----------------------------------------------------------------------


def seeded_total_loss(learner, episodes: Episodes) -> torch.Tensor:
    """The task objective with the same latent/weight noise on every call."""
    torch.manual_seed(123)
    return learner.task_loss(*(t[0] for t in episodes.tensors()))[0]


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_through_both_loops_matches_finite_differences(first_order):
    torch.manual_seed(0)
    learner = build(first_order=first_order, inner_steps=2, finetune_steps=2, finetune_lr=0.5)
    learner = learner.double()
    episodes = as_float64(sample_episodes(class_patterns(10, seed=1), 1, 3, 2, 2, seed=2))
    seeded_total_loss(learner, episodes).backward()

    errors = {}
    for name in ["inner_lr", "finetune_lr", "encoder.weight", "decoder.weight", "relation.4.bias"]:
        parameter = learner.get_parameter(name)
        analytic = parameter.grad.flatten()
        indices = analytic.abs().argsort(descending=True)[:6]
        numeric = central_differences(
            lambda: seeded_total_loss(learner, episodes), parameter, indices
        )
        errors[name] = ((analytic[indices] - numeric).norm() / numeric.norm()).item()

    if not first_order:
        assert max(errors.values()) < 1e-5, errors
    else:  # what flows only through the inner-loop gradients is lost
        assert errors["encoder.weight"] > 1e-2 and errors["decoder.weight"] > 1e-2, errors


# -- training ----------------------------------------------------------------------------


def test_training_reduces_the_loss_on_synthetic_tasks():
    torch.manual_seed(0)
    learner = build()
    before, after, losses = held_out_losses_around_training(learner, steps=30)
    assert after < 0.7 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_same_seed_gives_identical_losses():
    def build_learner() -> leo.LatentEmbeddingOptimization:
        return build(feature_dropout=0.3)

    runs = [meta_train_from_torch_seed(build_learner, torch_seed=7, steps=3) for _ in range(2)]
    assert runs[0] == runs[1]
