"""Prototypical Networks: prototypes, logits, task dropout, training, determinism."""

from __future__ import annotations

import pydantic
import pytest
import torch
from synthetic import (
    IMAGE_SIZE,
    build_context,
    class_patterns,
    held_out_losses_around_training,
    meta_train_from_torch_seed,
    record_dropout_masks,
    sample_episodes,
)

from metalab.algorithms import protonets
from metalab.algorithms.base import TrainProgress
from metalab.algorithms.embedding import class_means, squared_euclidean_logits

SEED_RATES = [0.05, 0.10, 0.15, 0.05]


def test_class_means_are_exact_support_means_for_any_label_order():
    embeddings = torch.tensor([[1.0, 2.0], [4.0, -2.0], [3.0, 6.0], [0.5, 0.25], [-1.0, 8.0]])
    labels = torch.tensor([1, 0, 1, 2, 0])
    expected = torch.tensor([[1.5, 3.0], [2.0, 4.0], [0.5, 0.25]])
    assert torch.equal(class_means(embeddings, labels, 3), expected)


def test_squared_euclidean_logits_by_hand():
    query = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    prototypes = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    expected = torch.tensor([[-1.0, -25.0], [-4.0, -8.0]])
    assert torch.equal(squared_euclidean_logits(query, prototypes), expected)


@pytest.mark.parametrize("n_way", [5, 7, 2])
def test_adapt_scores_queries_by_distance_to_support_means(n_way):
    torch.manual_seed(0)
    learner = protonets.build(protonets.Options(), build_context(n_way=5))
    k_shot = 3
    support_y = torch.arange(n_way).repeat_interleave(k_shot)
    shuffle = torch.randperm(len(support_y))
    support_x = torch.randn(len(support_y), 1, IMAGE_SIZE, IMAGE_SIZE)[shuffle]
    support_y = support_y[shuffle]
    query_x = torch.randn(11, 1, IMAGE_SIZE, IMAGE_SIZE)

    logits = learner.adapt(support_x, support_y)(query_x)

    assert logits.shape == (11, n_way)
    with torch.no_grad():
        support = learner.embedding(support_x)
        query = learner.embedding(query_x)
    prototypes = torch.stack([support[support_y == c].mean(0) for c in range(n_way)])
    expected = -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected)


def test_meta_gradients_reach_every_parameter_with_a_different_way_count():
    torch.manual_seed(0)
    learner = protonets.build(protonets.Options(train_n_way=8), build_context(n_way=5))
    assert learner.train_n_way == 8
    episodes = sample_episodes(class_patterns(12, seed=1), 2, 8, 2, 2, seed=2)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert 0.0 <= stats.accuracy <= 1.0 and stats.loss > 0
    for name, parameter in learner.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert not any(
        name.startswith("embedding.network.head") for name, _ in learner.named_parameters()
    )


def test_options_are_validated():
    with pytest.raises(pydantic.ValidationError):
        protonets.Options(task_dropout_rates=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(pydantic.ValidationError):
        protonets.Options(train_n_way=1)
    with pytest.raises(pydantic.ValidationError):
        protonets.Options(train_ways=60)


def test_model_is_the_headless_network_a_pretrained_body_loads_into():
    learner = protonets.build(protonets.Options(), build_context())
    assert learner.model is learner.embedding.network
    assert isinstance(learner.model.head, torch.nn.Identity)
    assert {name.split(".")[0] for name, _ in learner.model.named_parameters()} == {"body"}


def test_train_n_way_defaults_to_context_n_way():
    learner = protonets.build(protonets.Options(), build_context(n_way=20))
    assert learner.train_n_way == 20


def test_support_with_a_missing_class_is_rejected():
    learner = protonets.build(protonets.Options(), build_context())
    support_x = torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"classes \[1\] have no example"):
        learner.adapt(support_x, torch.tensor([0, 0, 2, 2]))


def test_task_dropout_rates_must_match_the_blocks():
    with pytest.raises(ValueError, match="one rate per Conv4 block"):
        protonets.build(protonets.Options(task_dropout_rates=[0.1, 0.1]), build_context())


def test_task_dropout_one_mask_per_task_shared_by_support_and_query():
    torch.manual_seed(0)
    learner = protonets.build(protonets.Options(task_dropout_rates=SEED_RATES), build_context())
    calls = record_dropout_masks(learner)
    episodes = sample_episodes(class_patterns(10, seed=1), 3, 5, 1, 2, seed=2)
    learner.meta_gradients(episodes, TrainProgress(0, 1))

    assert len(calls) == 6  # support and query pass of each of 3 tasks
    shapes = learner.embedding.network.block_output_shapes
    for task in range(3):
        support_masks, query_masks = calls[2 * task], calls[2 * task + 1]
        for block, rate in enumerate(SEED_RATES):
            assert support_masks[block] is query_masks[block]
            mask = support_masks[block]
            assert mask.shape == (1, *shapes[block])
            kept = mask != 0
            torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - rate)))
    for first, second in [(0, 2), (0, 4), (2, 4)]:
        assert not torch.equal(calls[first][2], calls[second][2])

    calls.clear()
    learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert calls == [None, None]  # no dropout at test time


def test_bf16_runs_the_network_under_autocast_and_returns_float32_logits():
    torch.manual_seed(0)
    learner = protonets.build(protonets.Options(), build_context(precision="bf16"))
    network = learner.embedding.network
    original = network.features
    dtypes = []

    def features(x, dropout_masks=None):
        out = original(x, dropout_masks)
        dtypes.append(out.dtype)
        return out

    network.features = features
    episodes = sample_episodes(class_patterns(10, seed=1), 1, 5, 1, 2, seed=2)
    logits = learner.adapt(episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_training_reduces_the_loss_on_synthetic_tasks():
    torch.manual_seed(0)
    learner = protonets.build(protonets.Options(task_dropout_rates=SEED_RATES), build_context())
    before, after, losses = held_out_losses_around_training(learner, steps=20)
    assert after < 0.6 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_same_seed_gives_identical_losses():
    def build_learner() -> protonets.PrototypicalNetwork:
        return protonets.build(protonets.Options(task_dropout_rates=SEED_RATES), build_context())

    runs = [meta_train_from_torch_seed(build_learner, torch_seed=7, steps=3) for _ in range(2)]
    assert runs[0] == runs[1]
