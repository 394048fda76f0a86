"""The seed project's one-pass designs: generated head weights (``generated_head``, the seed's
"Meta Networks") and FiLM-conditioned prototypes (``film_prototypes``, its "embedding-based
Meta Networks")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic import (
    as_float64,
    build_context,
    central_differences,
    class_patterns,
    held_out_losses_around_training,
    meta_train_from_torch_seed,
    record_dropout_masks,
    sample_episodes,
)

from metalab.algorithms import film_prototypes, generated_head
from metalab.algorithms.base import TrainProgress
from metalab.data.episodes import Episodes

SEED_RATES = [0.05, 0.10, 0.15, 0.05]
VARIANTS = [generated_head, film_prototypes]


def build(module, **options):
    return module.build(module.Options(**options), build_context())


# -- both variants ---------------------------------------------------------------------


@pytest.mark.parametrize("module", VARIANTS)
@pytest.mark.parametrize("n_way", [5, 8, 3])
def test_shapes_and_gradients_for_any_way_count(module, n_way):
    torch.manual_seed(0)
    learner = build(module)
    episodes = sample_episodes(class_patterns(12, seed=1), 2, n_way, 2, 3, seed=2)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert stats.loss > 0 and 0.0 <= stats.accuracy <= 1.0
    for name, parameter in learner.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    logits = learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert logits.shape == (3 * n_way, n_way)


@pytest.mark.parametrize("module", VARIANTS)
def test_adapt_is_a_forward_pass_that_changes_no_parameter(module):
    torch.manual_seed(0)
    learner = build(module)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    episodes = sample_episodes(class_patterns(12, seed=1), 1, 5, 1, 2, seed=2)
    learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    for name, parameter in learner.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None, name


@pytest.mark.parametrize("module", VARIANTS)
def test_relabelling_the_support_permutes_the_logit_columns(module):
    torch.manual_seed(0)
    learner = build(module)
    episodes = sample_episodes(class_patterns(12, seed=1), 1, 5, 2, 2, seed=2)
    support_x, support_y, query_x = (
        episodes.support_x[0],
        episodes.support_y[0],
        episodes.query_x[0],
    )
    relabel = torch.tensor([3, 0, 4, 1, 2])
    order = torch.randperm(len(support_y))  # the support order must not matter either

    logits = learner.adapt(support_x, support_y)(query_x)
    relabelled = learner.adapt(support_x[order], relabel[support_y][order])(query_x)

    torch.testing.assert_close(relabelled[:, relabel], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module", VARIANTS)
def test_task_dropout_one_mask_per_task_shared_by_support_and_query(module):
    torch.manual_seed(0)
    learner = build(module, task_dropout_rates=SEED_RATES)
    calls = record_dropout_masks(learner)
    episodes = sample_episodes(class_patterns(10, seed=1), 3, 5, 1, 2, seed=2)
    learner.meta_gradients(episodes, TrainProgress(0, 1))

    assert len(calls) == 6  # support and query pass of each of 3 tasks
    for task in range(3):
        support_masks, query_masks = calls[2 * task], calls[2 * task + 1]
        assert all(s is q for s, q in zip(support_masks, query_masks, strict=True))
        assert all(m is not None for m in support_masks)
    for first, second in [(0, 2), (0, 4), (2, 4)]:
        assert not torch.equal(calls[first][1], calls[second][1])

    calls.clear()
    learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert calls == [None, None]  # no dropout at test time


@pytest.mark.parametrize("module", VARIANTS)
def test_bf16_gives_finite_float32_logits_and_gradients(module):
    torch.manual_seed(0)
    learner = module.build(module.Options(), build_context(precision="bf16"))
    episodes = sample_episodes(class_patterns(10, seed=1), 2, 5, 1, 2, seed=2)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert torch.isfinite(torch.tensor(stats.loss))
    for name, parameter in learner.named_parameters():
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    logits = learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(("module", "steps"), [(generated_head, 40), (film_prototypes, 20)])
def test_training_reduces_the_loss_on_synthetic_tasks(module, steps):
    torch.manual_seed(0)
    learner = build(module, task_dropout_rates=SEED_RATES)
    before, after, losses = held_out_losses_around_training(learner, steps=steps)
    assert after < 0.7 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("module", VARIANTS)
def test_same_seed_gives_identical_losses(module):
    def build_learner():
        return build(module, task_dropout_rates=SEED_RATES)

    runs = [meta_train_from_torch_seed(build_learner, torch_seed=7, steps=3) for _ in range(2)]
    assert runs[0] == runs[1]


# -- generated head ----------------------------------------------------------------------


def test_example_meta_information_is_the_gradient_of_each_examples_own_loss():
    torch.manual_seed(0)
    representations = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    gradient = generated_head.example_loss_gradients(representations, labels, 3, keep_graph=False)

    # By hand: logits_ic = -|z_i - m_c|^2, d CE_i / d logit_ic = p_ic - [y_i = c],
    # d logit_ic / d z_i = -2 (z_i - m_c), the class means m held fixed.
    z = representations
    means = torch.stack([z[labels == c].mean(0) for c in range(3)])
    probabilities = torch.softmax(-((z[:, None] - means[None]) ** 2).sum(-1), dim=1)
    residual = probabilities - F.one_hot(labels, 3).double()
    expected = (residual[:, :, None] * -2.0 * (z[:, None] - means[None])).sum(1)
    torch.testing.assert_close(gradient, expected)


def test_example_meta_information_is_differentiable_including_the_class_means():
    torch.manual_seed(0)
    representations = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(
        lambda z: generated_head.example_loss_gradients(z, labels, 3, keep_graph=True),
        (representations,),
    )


def test_output_layer_meta_information_by_hand():
    torch.manual_seed(0)
    representations = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    gradient = generated_head.output_layer_gradient(representations, labels, 3, keep_graph=False)
    # At zero weights p = 1/3 for every class: row c = sum_i (1/3 - [y_i = c]) z_i.
    residual = 1.0 / 3.0 - F.one_hot(labels, 3).double()
    torch.testing.assert_close(gradient, residual.T @ representations)


def meta_loss(learner, episodes: Episodes) -> torch.Tensor:
    logits = learner.task_logits(episodes.support_x[0], episodes.support_y[0], episodes.query_x[0])
    return F.cross_entropy(logits, episodes.query_y[0])


@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_through_the_meta_information_matches_finite_differences(second_order):
    torch.manual_seed(0)
    learner = build(generated_head, second_order=second_order).double()
    # The generators' last layers start at zero, which would switch off the paths through
    # the meta-information; give them generic values first.
    with torch.no_grad():
        for generator in (learner.task_generator, learner.weight_generator, learner.bias_generator):
            generator[-1].weight.normal_(std=0.3)
            generator[-1].bias.normal_(std=0.3)
    episodes = as_float64(sample_episodes(class_patterns(10, seed=1), 1, 3, 2, 2, seed=2))
    learner.meta_gradients(episodes, TrainProgress(0, 1))

    errors = {}
    for name in ["slow_layer.weight", "V", "embedding.network.body.3.0.weight"]:
        parameter = learner.get_parameter(name)
        analytic = parameter.grad.flatten()
        indices = analytic.abs().argsort(descending=True)[:8]
        numeric = central_differences(lambda: meta_loss(learner, episodes), parameter, indices)
        errors[name] = ((analytic[indices] - numeric).norm() / numeric.norm()).item()

    if second_order:
        assert max(errors.values()) < 1e-5, errors
    else:  # V's gradient stays exact; dropping the paths through the gradients does not
        assert errors["V"] < 1e-5, errors
        assert errors["slow_layer.weight"] > 1e-2, errors
        assert errors["embedding.network.body.3.0.weight"] > 1e-2, errors


def test_without_task_fast_weights_the_hidden_layer_is_slow_only():
    torch.manual_seed(0)
    learner = build(generated_head, task_fast_weights=False)
    features = torch.randn(6, learner.embedding.feature_dim)
    fast_weight, weight, bias = learner.generate(features, torch.tensor([0, 1, 2, 0, 1, 2]), False)
    assert fast_weight is None
    assert weight.shape == (3, 64) and bias.shape == (3,)
    torch.testing.assert_close(
        learner.represent(features, None), F.relu(learner.slow_layer(features))
    )


# -- FiLM prototypes ---------------------------------------------------------------------


def test_untrained_embedding_variant_is_a_prototype_classifier():
    """The meta-learner's last layer starts at zero: no modulation before training."""
    torch.manual_seed(0)
    learner = build(film_prototypes, similarity="squared_euclidean")
    episodes = sample_episodes(class_patterns(10, seed=1), 1, 4, 3, 2, seed=2)
    support_x, support_y, query_x = (
        episodes.support_x[0],
        episodes.support_y[0],
        episodes.query_x[0],
    )
    logits = learner.adapt(support_x, support_y)(query_x)
    with torch.no_grad():
        support, query = learner.embedding(support_x), learner.embedding(query_x)
    prototypes = torch.stack([support[support_y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(logits, -((query[:, None] - prototypes[None]) ** 2).sum(-1))


def test_task_summary_ignores_class_order_and_cosine_logits_are_bounded():
    prototypes = torch.randn(5, 7)
    summary = film_prototypes.task_summary(prototypes)
    assert summary.shape == (14,)
    torch.testing.assert_close(film_prototypes.task_summary(prototypes.flip(0)), summary)

    torch.manual_seed(0)
    learner = build(film_prototypes, initial_temperature=4.0)
    logits = learner.similarity_logits(torch.randn(9, 7), prototypes)
    assert logits.shape == (9, 5) and logits.abs().max() <= 4.0 + 1e-5
