"""Meta Networks (Munkhdalai & Yu 2017): shapes, the attention read of the memory, what the
fast weights do, meta-gradients against finite differences, learning a toy task,
checkpoints and batched evaluation.

Tiny configurations throughout: 16x16 images, conv nets of 4 channels, m and d of 5
hidden units (`tiny`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from synthetic import (
    as_float64,
    build_context,
    central_differences,
    class_patterns,
    meta_train,
    sample_episodes,
)

from metalab.algorithms import meta_networks
from metalab.algorithms.base import BuildContext, TrainProgress
from metalab.data.episodes import EpisodeIndex, Episodes
from metalab.evaluation import evaluate_episode_set
from metalab.learner_api import Learner
from metalab.models.config import ModelConfig

N_WAY, K_SHOT, QUERIES = 3, 2, 2
CHANNELS, FC_UNITS, LAYERS = 4, 6, 3


def tiny(channels: int = CHANNELS, **options) -> meta_networks.MetaNetworks:
    """A seeded tiny learner: `LAYERS` conv layers of ``channels``, FC_UNITS keys, m and d
    of 5 hidden units, 5 output units, 16x16 images."""
    torch.manual_seed(0)
    validated = meta_networks.Options(
        conv_layers=LAYERS, fc_units=FC_UNITS, meta_hidden=5, **options
    )
    context = BuildContext(model=ModelConfig(hidden=channels), n_way=5, image_size=16)
    return meta_networks.build(validated, context)


def episodes(tasks: int = 2, n_way: int = N_WAY, seed: int = 2) -> Episodes:
    """Seeded synthetic tasks: support [T, N*K, 1, 16, 16], query [T, N*Q, 1, 16, 16]."""
    return sample_episodes(class_patterns(10, seed=1), tasks, n_way, K_SHOT, QUERIES, seed=seed)


def weight_shapes(network: meta_networks.AugmentedConvNet) -> list[torch.Size]:
    return [w.shape for w in network.weights()]


# -- shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["pairs", "cross_entropy"])
def test_every_tensor_has_its_documented_shape(loss):
    learner = tiny(representation_loss=loss)
    task = episodes(tasks=1)
    support_x, support_y, query_x = task.support_x[0], task.support_y[0], task.query_x[0]
    support, queries = N_WAY * K_SHOT, N_WAY * QUERIES

    # b: 3 conv weights [4, Cin, 3, 3], hidden FC [6, 4] (16 -> 8 -> 4 -> 2: D = 4 * 2 * 2
    # = 16), output [5, 6]; u: the same without the output layer (pairs) or with it.
    features = CHANNELS * 2 * 2
    base = [(4, 1, 3, 3), (4, 4, 3, 3), (4, 4, 3, 3), (FC_UNITS, features), (5, FC_UNITS)]
    assert [tuple(s) for s in weight_shapes(learner.base)] == base
    u_count = 5 if loss == "cross_entropy" else 4
    assert [tuple(s) for s in weight_shapes(learner.representation)] == base[:u_count]

    memory = learner.memorise(support_x, support_y, keep_graph=False)
    # Q*: u's conv weights and key layer, each its slow weight's shape.
    assert [tuple(w.shape) for w in memory.representation_fast] == base[:4]
    assert memory.keys.shape == (support, FC_UNITS)
    parameters = sum(math.prod(s) for s in base)
    assert memory.memory.shape == (support, parameters)
    assert memory.n_way == N_WAY

    fast, attention = learner.read(memory, query_x)
    assert [tuple(w.shape) for w in fast] == [(queries, *s) for s in base]
    assert attention.shape == (queries, support)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(queries))
    assert learner.query_logits(memory, query_x).shape == (queries, N_WAY)
    assert learner.representation_keys(query_x, None).shape == (queries, FC_UNITS)
    assert learner.base_logits(query_x, 5, None).shape == (queries, 5)


def test_preprocessed_gradients_are_log_magnitude_and_clipped_sign():
    gradients = torch.tensor([1.0, -1e-2, 1e-5, 0.0, -5.0])
    out = meta_networks.preprocess_gradients(gradients, 7.0)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out[:, 0], (gradients.abs() + 1.1920929e-07).log().div(7).clamp(-1))
    assert out[2, 0] == -1.0  # |g| < e^-7: the magnitude saturates...
    torch.testing.assert_close(out[2, 1], torch.tensor(1e-5 * math.exp(7)))  # ...the sign does not
    assert out[:, 1].tolist()[:2] == [1.0, -1.0] and out[4, 1] == -1.0
    assert meta_networks.preprocess_gradients(gradients, None).shape == (5, 1)


def test_more_ways_than_output_units_is_an_error_fewer_use_the_first_units():
    learner = tiny()
    task = episodes(tasks=1, n_way=5)
    logits = learner.adapt(task.support_x[0], task.support_y[0])(task.query_x[0])
    assert logits.shape == (5 * QUERIES, 5)
    labels = torch.arange(6).repeat_interleave(1)
    with pytest.raises(ValueError, match="5 output units, got 6-way"):
        learner.adapt(torch.rand(6, 1, 16, 16), labels)

    wider = tiny(output_units=8)  # trained 5-way, room for 8-way tasks
    assert (wider.train_n_way, wider.base.fc[1].shape[0]) == (5, 8)
    assert wider.adapt(torch.rand(6, 1, 16, 16), labels)(task.query_x[0]).shape == (5 * QUERIES, 6)
    with pytest.raises(ValueError, match="output_units"):
        tiny(output_units=4)


def test_bad_options_name_the_key():
    with pytest.raises(ValidationError, match="representation_loss"):
        meta_networks.Options(representation_loss="triplet")
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        meta_networks.Options(fast_weights=True)
    with pytest.raises(ValueError, match="fp32 only"):
        meta_networks.build(meta_networks.Options(), build_context(precision="bf16"))


# -- the memory and the fast weights -----------------------------------------------------------


def test_attention_reads_the_entry_of_an_identical_support_example():
    """A query that is a support image has the same key as that entry: with distinct keys
    and a sharp softmax (scale 100; the paper's is 1), its attention is ~1 there and its
    fast weights are that entry's.

    Untrained keys of similar images are nearly parallel (non-negative ReLU features), so
    the support images here ink disjoint 4x4 blocks and u has one conv layer (bias-free:
    blank regions give zero features) and 64 keys: the keys are far apart."""
    torch.manual_seed(0)
    options = meta_networks.Options(
        conv_layers=1, fc_units=64, meta_hidden=5, attention_scale=100.0
    )
    context = BuildContext(model=ModelConfig(hidden=CHANNELS), n_way=5, image_size=16)
    learner = meta_networks.build(options, context)
    support_x = torch.zeros(4, 1, 16, 16)
    for i in range(4):
        row, column = divmod(i, 2)
        support_x[i, 0, 8 * row : 8 * row + 4, 8 * column : 8 * column + 4] = 1.0
    support_y = torch.arange(4)
    with torch.no_grad():
        memory = learner.memorise(support_x, support_y, keep_graph=False)
        keys = F.normalize(memory.keys, dim=1)
        off_diagonal = (keys @ keys.T)[~torch.eye(4, dtype=torch.bool)]
        assert off_diagonal.max() < 0.8, "keys not distinct: the test would mean nothing"

        fast, weights = learner.read(memory, support_x)

    assert (weights.diagonal() > 0.99).all(), weights
    flat = torch.cat([w.flatten(1) for w in fast], dim=1)
    torch.testing.assert_close(flat, memory.memory, rtol=0, atol=0.01 * memory.memory.abs().max())


def test_attention_is_a_softmax_of_scaled_cosine():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    memory = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weights = meta_networks.attention(query, memory, scale=2.0)
    cosine = torch.tensor([[1.0, 0.0, 2**-0.5], [0.0, 1.0, 2**-0.5]])
    torch.testing.assert_close(weights, torch.softmax(2.0 * cosine, dim=1))


def test_the_fast_weights_change_the_base_learners_output():
    """Zeroing the memory (b's example-level fast weights) leaves b's slow network alone
    (ReLU(conv(h, 0)) = 0): the logits change, and equal the slow network's."""
    learner = tiny()
    task = episodes(tasks=1)
    memory = learner.memorise(task.support_x[0], task.support_y[0], keep_graph=False)
    query_x = task.query_x[0]
    with torch.no_grad():
        with_fast = learner.query_logits(memory, query_x)
        zeroed = learner.query_logits(
            memory._replace(memory=torch.zeros_like(memory.memory)), query_x
        )
        slow_only = learner.base_logits(query_x, N_WAY, None)
    torch.testing.assert_close(zeroed, slow_only)
    assert (with_fast - zeroed).abs().max() > 1e-3 * zeroed.abs().max()

    # u's task-level fast weights change the keys, so what the queries read.
    zero_q = [torch.zeros_like(w) for w in memory.representation_fast]
    with torch.no_grad():
        keys = learner.representation_keys(query_x, memory.representation_fast)
        slow_keys = learner.representation_keys(query_x, zero_q)
    assert (keys - slow_keys).abs().max() > 1e-3 * slow_keys.abs().max()


def test_the_memory_is_each_support_examples_own_gradient_through_m():
    """W*_i = m(grad of example i's own loss on b's slow weights): the batched per-example
    gradients equal S separate backward passes."""
    learner = tiny(scale_fast_weights=False)
    task = episodes(tasks=1)
    support_x, support_y = task.support_x[0], task.support_y[0]
    memory = learner.example_fast_weights(support_x, support_y, N_WAY, keep_graph=False)
    for i in (0, 3):
        weights = learner.base.weights()
        loss = F.cross_entropy(
            learner.base_logits(support_x[i : i + 1], N_WAY, None), support_y[i : i + 1]
        )
        gradients = torch.autograd.grad(loss, weights)
        expected = learner.generate("m", [g.unsqueeze(0) for g in gradients], [1.0] * 5)
        flat = torch.cat([w.flatten() for w in expected])
        torch.testing.assert_close(memory[i], flat, rtol=1e-4, atol=1e-6)


# -- meta-gradients ------------------------------------------------------------------------------


def meta_objective(learner: meta_networks.MetaNetworks, batch: Episodes) -> torch.Tensor:
    """The mean query loss `meta_gradients` differentiates (second order or not as the
    learner's option)."""
    losses = []
    for t in range(batch.num_tasks):
        memory = learner.memorise(
            batch.support_x[t], batch.support_y[t], learner.options.second_order
        )
        logits = learner.query_logits(memory, batch.query_x[t])
        losses.append(F.cross_entropy(logits, batch.query_y[t]))
    return torch.stack(losses).mean()


# One entry each of b's slow weights (first conv, output layer), u's (a conv, the key
# layer) and the meta learner (m and d, both groups).
CHECKED = [
    "base.body.0",
    "base.fc.1",
    "representation.body.1",
    "representation.fc.0",
    "m.conv.0.weight",
    "m.fc.4.weight",
    "d_lstm.conv.weight_ih",
    "d_out.fc.weight",
]


@pytest.mark.parametrize("loss", ["pairs", "cross_entropy"])
def test_second_order_meta_gradients_match_finite_differences(loss):
    learner = tiny(channels=3, second_order=True, representation_loss=loss).double()
    batch = as_float64(episodes(tasks=2))
    # Move m and d off their near-zero start so every path carries signal.
    with torch.no_grad():
        for module in (*learner.m.values(), *learner.d_out.values()):
            for parameter in module.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    stats = learner.meta_gradients(batch, TrainProgress(0, 1))
    assert stats.loss == pytest.approx(meta_objective(learner, batch).item(), rel=1e-12)
    parameters = dict(learner.named_parameters())
    generator = torch.Generator().manual_seed(5)
    for name in CHECKED:
        parameter = parameters[name]
        indices = torch.randint(parameter.numel(), (2,), generator=generator)
        # Step 1e-7: the gradient preprocessing bends sharply (slope e^7 in its sign part).
        numeric = central_differences(
            lambda: meta_objective(learner, batch), parameter, indices, step=1e-7
        )
        analytic = parameter.grad.view(-1)[indices]
        torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8, msg=name)


def test_first_order_treats_the_gradients_as_constants():
    """First order (the reference code): the meta learner's gradients are exact (the meta
    information does not depend on m or d), the slow weights' miss the path through the
    meta information, so they differ from the second-order ones; every parameter still
    gets a gradient (u's through the keys)."""
    batch = as_float64(episodes(tasks=2))
    grads = {}
    for second_order in (False, True):
        learner = tiny(channels=3, second_order=second_order).double()
        with torch.no_grad():
            for module in (*learner.m.values(), *learner.d_out.values()):
                for parameter in module.parameters():
                    parameter.add_(0.3 * torch.randn_like(parameter))
        learner.meta_gradients(batch, TrainProgress(0, 1))
        grads[second_order] = {n: p.grad.clone() for n, p in learner.named_parameters()}
        if not second_order:
            for name, gradient in grads[False].items():
                assert gradient.abs().max() > 0, f"no meta-gradient reaches {name}"
            parameters = dict(learner.named_parameters())
            for name in ("m.conv.0.weight", "d_lstm.fc.weight_ih"):
                indices = torch.tensor([0, 3])
                numeric = central_differences(
                    lambda learner=learner: meta_objective(learner, batch),
                    parameters[name],
                    indices,
                )
                analytic = parameters[name].grad.view(-1)[indices]
                torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8, msg=name)
    for name in ("m.conv.0.weight", "d_out.fc.weight"):
        torch.testing.assert_close(grads[False][name], grads[True][name], msg=name)
    for name in ("base.body.0", "representation.body.0"):
        assert not torch.allclose(grads[False][name], grads[True][name]), name


# -- learning, checkpoints, evaluation ----------------------------------------------------------


def test_learns_a_separable_toy_task_in_a_few_dozen_iterations():
    """40 Adam steps on 5-way 1-shot tasks of 12 synthetic classes (sharp attention, 3 conv
    layers of 8 channels): held-out tasks of the same classes go from chance to >= 80%."""
    torch.manual_seed(0)
    options = meta_networks.Options(conv_layers=3, attention_scale=10.0)
    learner = meta_networks.build(options, build_context())
    patterns = class_patterns(12, seed=3)
    held_out = sample_episodes(patterns, 6, 5, 1, 3, seed=1000)

    def accuracy() -> float:
        correct = [
            (learner.adapt(s, y)(q).argmax(-1) == qy).float().mean()
            for s, y, q, qy in zip(*held_out.__dict__.values(), strict=True)
        ]
        return torch.stack(correct).mean().item()

    before = accuracy()
    losses = meta_train(learner, patterns, steps=40, seed=0)
    after = accuracy()
    assert before <= 0.4
    assert after >= 0.8, (before, after, losses[::5])


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    learner = tiny(representation_loss="cross_entropy")
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save(learner.state_dict(), tmp_path / "meta_networks.pt")
    restored = tiny(representation_loss="cross_entropy")
    restored.load_state_dict(torch.load(tmp_path / "meta_networks.pt"))
    task = episodes(tasks=1)
    expected = learner.adapt(task.support_x[0], task.support_y[0])(task.query_x[0])
    actual = restored.adapt(task.support_x[0], task.support_y[0])(task.query_x[0])
    assert torch.equal(actual, expected)


def test_adapt_changes_no_parameter_and_leaves_no_gradient():
    learner = tiny(second_order=True)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    task = episodes(tasks=1)
    logits = learner.adapt(task.support_x[0], task.support_y[0])(task.query_x[0])
    assert not logits.requires_grad
    for name, parameter in learner.named_parameters():
        assert torch.equal(parameter, before[name]) and parameter.grad is None, name


def test_batched_evaluation_scores_every_episode_as_one_at_a_time():
    """`evaluate_episode_set` through `adapt_many` (chunks of episodes) and through `adapt`
    one episode at a time: the same accuracies, and the same logits."""
    generator = torch.Generator().manual_seed(0)
    characters, drawings, episodes_count = 8, 6, 5
    patterns = torch.rand(characters, 1, 16, 16, generator=generator) < 0.3
    flips = torch.rand(characters, drawings, 16, 16, generator=generator) < 0.05
    images = ((patterns ^ flips).to(torch.uint8) * 255).reshape(-1, 16, 16)
    chosen = torch.stack([torch.randperm(characters, generator=generator)[:3] for _ in range(5)])
    order = torch.rand(episodes_count, 3, drawings, generator=generator).argsort(dim=2)
    index = EpisodeIndex(
        chosen.unsqueeze(-1) * drawings + order[:, :, :3],
        torch.randint(0, 4, (episodes_count, 3), generator=generator),
        chosen,
        k_shot=1,
    )
    validated = meta_networks.Options(conv_layers=LAYERS, fc_units=FC_UNITS, meta_hidden=5)
    torch.manual_seed(0)
    meta_learner = meta_networks.build(
        validated, BuildContext(model=ModelConfig(hidden=CHANNELS), n_way=5, image_size=16)
    )
    learner = Learner(meta_learner, validated, 5, 16)
    assert learner.batches_tasks

    batched = evaluate_episode_set(learner, images, index, "3w1s", seed=3, progress=False)
    looped = evaluate_episode_set(
        learner, images, index, "3w1s", seed=3, progress=False, batch_tasks=False
    )
    np.testing.assert_array_equal(batched.accuracy_after, looped.accuracy_after)
    assert batched.accuracy_before is None and batched.adaptation_steps is None

    from metalab.data.episodes import materialize

    tasks = materialize(images, index)
    together = meta_learner.adapt_many(tasks.support_x, tasks.support_y)(tasks.query_x)
    one_by_one = torch.stack(
        [
            meta_learner.adapt(tasks.support_x[t], tasks.support_y[t])(tasks.query_x[t])
            for t in range(episodes_count)
        ]
    )
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)
