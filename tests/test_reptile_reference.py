"""Reptile's reference recipe (openai/supervised-reptile): more shots in meta-training than
at test time, inner mini-batches, and one inner Adam state carried from task to task; and
that the defaults still give the first Reptile, bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from synthetic import as_float64, half_ink_patterns, stream_episodes
from torch.func import functional_call

from metalab import training
from metalab.algorithms.base import TrainProgress
from metalab.algorithms.reptile import Options, ReptileLearner, support_batches
from metalab.data.episodes import EpisodeIndex, Episodes, sample_episode_index
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.distributed import DistributedContext, NotSplittableError, check_splittable
from metalab.learner_api import learner_from_payload
from metalab.models import Conv4
from metalab.params import validate_params
from metalab.schema import ParamsError

IMAGE_SIZE = 14
N_WAY = 3
LR = 0.01
Weights = dict[str, torch.Tensor]


def make_learner(dtype: torch.dtype = torch.float64, **options) -> ReptileLearner:
    torch.manual_seed(0)
    model = Conv4(N_WAY, IMAGE_SIZE, hidden=8, downsample="stride").to(dtype)
    return ReptileLearner(model, Options(inner_lr=LR, **options))


def episodes_64(num_tasks: int, n_way: int = N_WAY, seed: int = 1) -> Episodes:
    """Tasks of 2 shots and 3 queries per class, float64."""
    generator = torch.Generator().manual_seed(seed)
    patterns = half_ink_patterns(6, seed, IMAGE_SIZE)
    return as_float64(stream_episodes(patterns, num_tasks, n_way, 2, 3, generator))


def hand_adam(
    model: Conv4,
    start: Weights,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    state: dict[str, tuple[int, torch.Tensor]],
) -> tuple[Weights, dict[str, tuple[int, torch.Tensor]], Weights]:
    """Full-batch Adam with betas (0, 0.999) written out, from weights ``start`` and, per
    name, a step count and second moment (missing names: step 0, zeros): m_t = g_t,
    v_t = 0.999 v_{t-1} + 0.001 g_t^2, p -= lr g_t / (sqrt(v_t / (1 - 0.999^t)) + 1e-8).
    Returns the weights, the state reached and the last gradients."""
    weights = {name: p.clone().requires_grad_(True) for name, p in start.items()}
    state = {name: state.get(name, (0, torch.zeros_like(p))) for name, p in weights.items()}
    grads: Weights = {}
    for _ in range(steps):
        logits = functional_call(model, weights, (support_x,))
        loss = F.cross_entropy(logits, support_y)
        grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True))
        with torch.no_grad():
            for name, p in weights.items():
                step, v = state[name]
                step, g = step + 1, grads[name]
                v = 0.999 * v + 0.001 * g * g
                p.sub_(LR * g / ((v / (1 - 0.999**step)).sqrt() + 1e-8))
                state[name] = (step, v)
    return {name: p.detach() for name, p in weights.items()}, state, grads


def atol(name: str) -> float:
    """A convolution's bias before BatchNorm has gradient 0 up to rounding, which Adam's
    normalisation magnifies (BatchNorm cancels it): its deltas agree only to ~1e-10."""
    return 1e-8 if re.fullmatch(r"body\.\d\.0\.bias", name) else 1e-12


def meta_weights(learner: ReptileLearner) -> Weights:
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


def carried(learner: ReptileLearner) -> dict[str, tuple[int, torch.Tensor]]:
    """The learner's carried state as `hand_adam` takes it (a copy)."""
    step = int(learner.inner_adam.step)
    return {name: (step, v.clone()) for name, (_, v) in learner.inner_adam.moments().items()}


# ------------------------------------------------------------------ the defaults
def old_meta_gradients(learner: ReptileLearner, episodes: Episodes) -> Weights:
    """The first Reptile's meta-gradient, as its code computed it before these options:
    per task a fresh torch Adam (betas 0, 0.999) on copied weights, ``inner_steps`` steps
    on `support_batches` of ``inner_batch_size`` (the whole support set by default),
    then -epsilon times the mean delta."""
    options = learner.options
    theta = dict(learner.model.named_parameters())
    delta_sum = {name: torch.zeros_like(p) for name, p in theta.items()}
    for t in range(episodes.num_tasks):
        params = {name: p.detach().clone().requires_grad_(True) for name, p in theta.items()}
        optimizer = torch.optim.Adam(params.values(), lr=options.inner_lr, betas=(0.0, 0.999))
        support_x, support_y = episodes.support_x[t], episodes.support_y[t]
        batches = support_batches(support_x.shape[0], options.inner_batch_size, options.inner_steps)
        for indices in batches:
            x = support_x if indices is None else support_x[indices]
            y = support_y if indices is None else support_y[indices]
            loss = F.cross_entropy(functional_call(learner.model, params, (x,)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for name, p in theta.items():
            delta_sum[name] += params[name].detach() - p.detach()
    return {name: d * (-options.epsilon / episodes.num_tasks) for name, d in delta_sum.items()}


@pytest.mark.parametrize("inner_batch_size", [None, 4], ids=["whole-support", "minibatches"])
def test_defaults_compute_the_first_reptiles_meta_gradient_bit_for_bit(inner_batch_size):
    learner = make_learner(dtype=torch.float32, inner_steps=3, inner_batch_size=inner_batch_size)
    episodes = episodes_64(3)
    episodes = Episodes(*(t.float() if t.is_floating_point() else t for t in episodes.tensors()))
    torch.manual_seed(5)  # the mini-batches' draws
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    torch.manual_seed(5)
    expected = old_meta_gradients(learner, episodes)
    for name, p in learner.model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    # Nothing else: no carried state, the train loop's shots and queries, one process.
    assert learner.inner_adam is None and learner.combines_tasks_by_mean
    assert learner.train_k_shot is None and learner.train_query_per_class is None
    assert all(key.startswith("model.") for key in learner.state_dict())


# ------------------------------------------------------------ inner mini-batches
def numbered_episodes(num_tasks: int, k_shot: int) -> Episodes:
    """Tasks whose support image i is the constant i + 1 (float32), so a batch shows which
    examples it holds: support_x [T, N*K, 1, S, S], class-major labels."""
    support = N_WAY * k_shot
    number = torch.arange(1, support + 1, dtype=torch.float32).view(1, support, 1, 1, 1)
    support_x = number.expand(num_tasks, support, 1, IMAGE_SIZE, IMAGE_SIZE).clone()
    labels = torch.arange(N_WAY).repeat_interleave(k_shot).repeat(num_tasks, 1)
    return Episodes(support_x, labels, support_x.clone(), labels.clone())


def test_inner_minibatches_hold_inner_batch_size_examples_and_each_pass_uses_all(monkeypatch):
    """12 support examples, batches of 4, 6 steps: every step trains on exactly 4
    examples (with their own labels) and each run of 3 steps is one pass over all 12."""
    learner = make_learner(dtype=torch.float32, inner_steps=6, inner_batch_size=4)
    episodes = numbered_episodes(num_tasks=2, k_shot=4)
    seen: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    real_forward, real_loss = learner.forward_with, F.cross_entropy

    def forward_with(params: Weights, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # inner steps (the query pass runs under no_grad)
            seen.append(x[:, 0, 0, 0].long() - 1)
        return real_forward(params, x)

    def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            labels.append(target)
        return real_loss(logits, target)

    monkeypatch.setattr(learner, "forward_with", forward_with)
    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert [len(batch) for batch in seen] == [4] * 12  # 6 steps x 2 tasks
    for batch, target in zip(seen, labels, strict=True):
        assert torch.equal(target, episodes.support_y[0][batch])
    for task in range(2):
        steps = seen[6 * task : 6 * task + 6]
        for first in (0, 3):
            assert sorted(torch.cat(steps[first : first + 3]).tolist()) == list(range(12))
    # Test time: the whole support set per step unless test_inner_batch_size says otherwise.
    seen.clear()
    learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=2)
    assert [len(batch) for batch in seen] == [12, 12]
    seen.clear()
    tested = make_learner(dtype=torch.float32, inner_batch_size=4, test_inner_batch_size=5)
    monkeypatch.setattr(tested, "forward_with", forward_with)
    tested.adapt(episodes.support_x[0], episodes.support_y[0], steps=3)
    assert [len(batch) for batch in seen] == [5, 5, 5]


# ----------------------------------------------------------- carried Adam state
def test_the_carried_adam_state_runs_on_from_task_to_task():
    """Two tasks of 3 steps: the first from a fresh state, the second from the state the
    first left (step 3 and its moments), each from the meta-weights; the learner keeps
    the state after 6 steps, which a state reset per task (step 3) would not give."""
    learner = make_learner(inner_steps=3, carry_inner_adam_state=True)
    episodes = episodes_64(2)
    theta = meta_weights(learner)
    learner.meta_gradients(episodes, TrainProgress(0, 1))

    model = learner.model
    task = [(episodes.support_x[t], episodes.support_y[t]) for t in range(2)]
    first, after_first, _ = hand_adam(model, theta, *task[0], 3, {})
    second, after_second, last_grads = hand_adam(model, theta, *task[1], 3, after_first)
    reset, after_reset, _ = hand_adam(model, theta, *task[1], 3, {})
    state = learner.inner_adam
    assert int(state.step) == 6
    for name, (exp_avg, exp_avg_sq) in state.moments().items():
        torch.testing.assert_close(exp_avg_sq, after_second[name][1], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(exp_avg, last_grads[name], rtol=1e-9, atol=1e-15)
        mean_delta = (first[name] - theta[name] + second[name] - theta[name]) / 2
        grad = model.get_parameter(name).grad
        torch.testing.assert_close(grad, -mean_delta, rtol=1e-7, atol=atol(name))
        if name.endswith("weight"):  # a state reset per task ends elsewhere
            assert not torch.allclose(second[name], reset[name], rtol=0, atol=1e-6), name
            assert not torch.allclose(exp_avg_sq, after_reset[name][1]), name
    # A next meta-batch continues from step 6.
    learner.meta_gradients(episodes, TrainProgress(1, 2))
    assert int(learner.inner_adam.step) == 12


def test_without_carrying_the_first_task_is_the_same():
    """From a fresh state, the carried path fine-tunes as the per-task torch Adam does."""
    episodes = episodes_64(1)
    fresh = make_learner(inner_steps=3)
    carrying = make_learner(inner_steps=3, carry_inner_adam_state=True)
    fresh.meta_gradients(episodes, TrainProgress(0, 1))
    carrying.meta_gradients(episodes, TrainProgress(0, 1))
    for a, b in zip(fresh.parameters(), carrying.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def trained_carrying_learner(**options) -> ReptileLearner:
    learner = make_learner(inner_steps=3, carry_inner_adam_state=True, **options)
    optimizer = torch.optim.SGD(learner.parameter_groups(), lr=learner.outer_lr)
    for iteration in range(2):
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(episodes_64(2, seed=10 + iteration), TrainProgress(iteration, 2))
        optimizer.step()
    return learner


def test_test_time_fine_tuning_starts_from_a_copy_of_the_carried_state():
    learner = trained_carrying_learner(test_inner_steps=2)
    state = copy.deepcopy(learner.inner_adam.state_dict())
    task = episodes_64(1, seed=20)
    support_x, support_y, query_x = task.support_x[0], task.support_y[0], task.query_x[0]
    logits = learner.adapt(support_x, support_y)(query_x)
    again = learner.adapt(support_x, support_y)(query_x)
    assert torch.equal(logits, again)  # the state was copied, not stepped
    for key, value in learner.inner_adam.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert int(learner.inner_adam.step) == 12

    theta = meta_weights(learner)
    adapted, _, _ = hand_adam(learner.model, theta, support_x, support_y, 2, carried(learner))
    expected = functional_call(learner.model, adapted, (query_x,))
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-12)
    from_fresh, _, _ = hand_adam(learner.model, theta, support_x, support_y, 2, {})
    assert not torch.allclose(functional_call(learner.model, from_fresh, (query_x,)), logits)


def test_a_new_way_count_continues_the_body_state_and_starts_the_head_fresh():
    learner = trained_carrying_learner()
    task = episodes_64(1, n_way=2, seed=21)
    support_x, support_y = task.support_x[0], task.support_y[0]
    adapted, _ = learner.fine_tune(support_x, support_y, 2, None, n_way=2)

    two_way = Conv4(2, IMAGE_SIZE, hidden=8, downsample="stride").double()
    start = meta_weights(learner)
    start["head.weight"] = torch.zeros_like(two_way.head.weight)
    start["head.bias"] = torch.zeros_like(two_way.head.bias)
    body_state = {k: v for k, v in carried(learner).items() if not k.startswith("head.")}
    expected, _, _ = hand_adam(two_way, start, support_x, support_y, 2, body_state)
    for name, p in adapted.items():
        torch.testing.assert_close(p, expected[name], rtol=1e-9, atol=1e-12)
    # A fresh Adam's first step moves each coordinate by lr (beta1 = 0, bias-corrected
    # v = g^2): the head's does (its bias has gradient 0 on balanced classes), the body's,
    # from the carried moments, does not.
    one_step, _ = learner.fine_tune(support_x, support_y, 1, None, n_way=2)
    head = one_step["head.weight"].abs()
    assert (head > 0).sum() > 4
    torch.testing.assert_close(
        head[head > 0], torch.full_like(head[head > 0], LR), rtol=1e-4, atol=0
    )
    body = (one_step["body.1.0.weight"] - start["body.1.0.weight"]).abs()
    assert body.max() < 0.5 * LR


def test_fine_tuning_many_tasks_at_once_from_the_carried_state():
    """`fine_tune_many` (stacked weights, grouped forward) ends where `fine_tune` ends on
    each task from the carried state, for the trained and a new way count."""
    learner = trained_carrying_learner()
    assert learner.batches_tasks
    episodes = episodes_64(3, seed=22)
    for labels, n_way in ((episodes.support_y, N_WAY), (episodes.support_y.clamp(max=1), 2)):
        many = learner.fine_tune_many(episodes.support_x, labels, 2, n_way)
        for t in range(3):
            one, _ = learner.fine_tune(episodes.support_x[t], labels[t], 2, None, n_way=n_way)
            for name, p in one.items():
                torch.testing.assert_close(many[name][t], p, rtol=0, atol=1e-8)


def test_carrying_needs_adam_and_a_single_process():
    with pytest.raises(ValidationError, match="carry_inner_adam_state needs inner_optimizer"):
        Options(carry_inner_adam_state=True, inner_optimizer="sgd")
    two_processes = DistributedContext(world_size=2, local_world_size=2)
    check_splittable(make_learner(), 4, two_processes)
    with pytest.raises(NotSplittableError):
        check_splittable(make_learner(carry_inner_adam_state=True), 4, two_processes)


# ------------------------------------------------------------- the train loop
TRAIN = dict(
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
RECIPE = {
    "inner_steps": 2,
    "test_inner_steps": 2,
    "inner_batch_size": 4,
    "train_shots": 3,
    "train_query_per_class": 1,
    "carry_inner_adam_state": True,
    "epsilon_final": 0.0,
}


def reptile_params(options: dict):
    experiment = {"algorithm": "reptile", "model": {"hidden": 8}, "options": options}
    return validate_params(
        {
            "data": {"split": {"validation_characters": 5}},
            "train": TRAIN,
            "experiments": {"rep": experiment},
        }
    )


@pytest.fixture
def data(tiny_prefetched_28):
    arrays = load_prefetched(tiny_prefetched_28)
    return arrays, make_split(arrays.character_origin, reptile_params({}).data.split)


class Interrupt(Exception):
    pass


def test_resumed_run_with_a_carried_state_ends_as_an_uninterrupted_one(data, tmp_path):
    arrays, split = data
    params = reptile_params(RECIPE)
    straight = training.Trainer("rep", params, arrays, split, tmp_path / "a", progress=False)
    straight.run()
    # 6 iterations x 2 tasks x 2 inner steps, all through one state.
    assert int(straight.learner.inner_adam.step) == 24

    def kill_at_five(metrics, step):
        if step == 5:
            raise Interrupt

    interrupted = training.Trainer(
        "rep", params, arrays, split, tmp_path / "b", progress=False, on_log=kill_at_five
    )
    with pytest.raises(Interrupt):
        interrupted.run()
    saved = interrupted.checkpoint.load()
    assert int(saved["learner"]["inner_adam.step"]) == 16  # the checkpoint at iteration 4
    torch.manual_seed(12345)  # a new process would start from another RNG state
    resumed = training.Trainer("rep", params, arrays, split, tmp_path / "b", progress=False)
    resumed.run()
    state = resumed.learner.state_dict()
    for key, value in straight.learner.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]

    # The model file keeps the state of its best iteration; a rebuilt learner adapts from it.
    payload = dataclasses.asdict(straight.model_payload())
    rebuilt = learner_from_payload(payload).meta_learner
    for key, value in straight.best_state.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def record_training_indices(monkeypatch) -> list[EpisodeIndex]:
    indices: list[EpisodeIndex] = []
    real = training.materialize

    def materialize(images: torch.Tensor, index: EpisodeIndex) -> Episodes:
        indices.append(index)
        return real(images, index)

    monkeypatch.setattr(training, "materialize", materialize)
    return indices


def meta_train_characters(split) -> set[int]:
    return {int(c) for c in split.meta_train[:, 0]}


def test_train_shots_change_only_the_meta_training_tasks(data, tmp_path, monkeypatch):
    arrays, split = data
    trainer = training.Trainer("rep", reptile_params(RECIPE), arrays, split, tmp_path)
    indices = record_training_indices(monkeypatch)
    support_sizes = []
    real_meta_gradients = trainer.learner.meta_gradients

    def meta_gradients(episodes: Episodes, progress: TrainProgress):
        support_sizes.append((episodes.support_x.shape[1], episodes.query_x.shape[1]))
        return real_meta_gradients(episodes, progress)

    monkeypatch.setattr(trainer.learner, "meta_gradients", meta_gradients)
    for _ in range(3):
        trainer.step()
    assert [(i.k_shot, i.query_per_class) for i in indices] == [(3, 1)] * 3
    assert support_sizes == [(3 * 3, 3 * 1)] * 3
    drawn = {int(c) for index in indices for c in index.character.flatten()}
    assert drawn <= meta_train_characters(split)
    for index in indices:  # 4 distinct drawings of each class's character
        rows = index.image_index.flatten(0, 1)
        assert all(len(set(row.tolist())) == 4 for row in rows)

    # Validation and the model file keep train.k_shot and train.query_per_class.
    assert (trainer.validation_index.k_shot, trainer.validation_index.query_per_class) == (1, 2)
    indices.clear()
    trainer.validate()
    assert indices and all((i.k_shot, i.query_per_class) == (1, 2) for i in indices)
    assert trainer.model_payload().k_shot == 1


def test_default_options_sample_the_training_tasks_as_before(data, tmp_path, monkeypatch):
    arrays, split = data
    trainer = training.Trainer("rep", reptile_params({}), arrays, split, tmp_path)
    indices = record_training_indices(monkeypatch)
    trainer.step()
    trainer.step()
    generator = torch.Generator().manual_seed(trainer.config.seed)
    for index in indices:
        expected = sample_episode_index(
            split.meta_train, arrays.drawings_per_character, 3, 1, 2, 2, generator
        )
        assert torch.equal(index.image_index, expected.image_index)
        assert index.k_shot == 1


def test_training_tasks_larger_than_a_character_stop_with_the_keys(data, tmp_path):
    arrays, split = data
    params = reptile_params({"train_shots": 19})
    message = (
        "experiments.rep: meta-training tasks of 19 shots \\+ 2 queries need 21 drawings per "
        "class; each character has 20"
    )
    with pytest.raises(ParamsError, match=message):
        training.Trainer("rep", params, arrays, split, tmp_path)
