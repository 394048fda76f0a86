"""Evaluation batched across episodes (`MetaLearner.adapt_many`, `Learner.adapt_many`)
scores every episode as the per-episode loop (`Learner.adapt` one episode at a time) does.

Every family is evaluated both ways on the same episodes: identical per-episode accuracies
before and after adaptation, and logits equal up to float32 rounding. A batching learner
runs its tasks through other kernels than a single task does (grouped convolutions over a
chunk of tasks, channels-last layout, the first BatchNorm folded into its convolution, the
MAML family's meta-training path), so float32 logits differ in the last bits (up to a few
1e-5 of the logits' scale after inner steps); in float64 they agree to 1e-10. Transductive
BatchNorm must stay per task: a task's predictions may not depend on the other tasks of
its chunk, support or query.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalab import evaluation
from metalab.algorithms import embedding
from metalab.algorithms.base import BuildContext, MetaLearner
from metalab.algorithms.registry import build_learner, options_class
from metalab.data.episodes import EpisodeIndex, materialize
from metalab.evaluation import episodes_per_call, evaluate_episode_set
from metalab.learner_api import Learner, UnsupportedTaskError
from metalab.models.config import ModelConfig

IMAGE_SIZE = 16
TRAINED_WAYS = 5
CHARACTERS, DRAWINGS = 12, 8
EPISODES = 7  # split unevenly into chunks (see `uneven_chunks`)
SETTINGS = {"5w2s": (5, 2), "3w1s": (3, 1)}  # 3-way: a way count other than the trained one
QUERIES = 3

STRIDE = {"downsample": "stride"}
# family: (algorithm, options, model). Each MAML-family variant exercises one piece of
# test-time adaptation: fixed lr, learned per-parameter lrs (Meta-SGD), per-step lrs and
# BatchNorm (MAML++), head only (ANIL), the per-task loop path (ResNet18 / no vectorising).
FAMILIES: dict[str, tuple[str, dict, dict]] = {
    "maml": ("maml", {"test_inner_steps": 2}, STRIDE),
    "fomaml": ("maml", {"test_inner_steps": 2, "first_order": True}, STRIDE),
    "metasgd": ("maml", {"test_inner_steps": 2, "inner_lr_mode": "per_parameter"}, STRIDE),
    "mamlpp": (
        "maml",
        {
            "inner_steps": 2,
            "test_inner_steps": 3,
            "inner_lr_mode": "per_layer_per_step",
            "multi_step_loss": True,
            "per_step_batchnorm": True,
        },
        STRIDE,
    ),
    "maml_dropout": (
        "maml",
        {"test_inner_steps": 2, "task_dropout_rates": [0.1, 0.1, 0.1, 0.1]},
        STRIDE,
    ),
    "maml_loop": ("maml", {"test_inner_steps": 2, "vectorise_tasks": False}, STRIDE),
    "anil": ("maml", {"adapt_parameters": "head", "test_inner_steps": 3}, {}),
    "anil_resnet18": (
        "maml",
        {"adapt_parameters": "head", "test_inner_steps": 3, "head_init": "zeros"},
        {"name": "resnet18"},
    ),
    "taml_entropy": ("taml", {"variant": "entropy", "test_inner_steps": 2}, STRIDE),
    "taml_theil": ("taml", {"variant": "inequality", "test_inner_steps": 2}, STRIDE),
    "anil_task_encoder": ("anil_task_encoder", {"test_inner_steps": 2}, STRIDE),
    "protonets": ("protonets", {}, {}),
    "generated_head": ("generated_head", {}, {}),
    "film_prototypes": ("film_prototypes", {}, {}),
    "leo": ("leo", {"inner_steps": 2, "finetune_steps": 1}, {}),
    # Reptile batches tasks when its test-time adaptation draws no random numbers (whole
    # support set every step, zero head for a new way count, the default): Adam on stacked
    # per-task weights through the grouped forward. SGD and the non-transductive predictor
    # on the max-pooling Conv4 too. (Adam with beta1 = 0 steps about lr x sign(gradient)
    # at first, so a gradient that is zero up to rounding moves a weight by up to lr either
    # way: at the default lr 0.001 that stays within float32 rounding here; at 0.01 it
    # reached 6e-4 of the logits.)
    "reptile": ("reptile", {"test_inner_steps": 3}, STRIDE),
    "reptile_sgd_non_transductive": (
        "reptile",
        {
            "test_inner_steps": 2,
            "inner_optimizer": "sgd",
            "inner_lr": 0.1,
            "transductive_eval": False,
        },
        {},
    ),
    # Not batched (the default `adapt_many`). With minibatches and a random head for a new
    # way count ("before" adaptation too) Reptile draws random numbers at test time, so it
    # only matches the per-episode loop if evaluation keeps adapting it episode by
    # episode, in order.
    "reptile_minibatch": (
        "reptile",
        {"test_inner_steps": 3, "inner_batch_size": 4, "head_init": "random"},
        {},
    ),
    "cavia": ("cavia", {"test_inner_steps": 2}, {}),
}
BATCHING = [family for family in FAMILIES if family not in ("reptile_minibatch", "cavia")]
# The embedding families embed one task per pass on the CPU; other devices embed all tasks
# of a call in one pass, which these runs force on the CPU.
EMBEDDING = ["protonets", "generated_head", "film_prototypes", "leo"]
PASSES = [(family, 1) for family in BATCHING] + [(family, 3) for family in EMBEDDING]


def make_learner(family: str, dtype: torch.dtype = torch.float32) -> Learner:
    """A tiny learner of `family` (Conv4 with 8 channels, or ResNet18) whose parameters are
    all moved off their initial values (zero-initialised generators, equal Meta-SGD lrs and
    zero MAML++ offsets would otherwise hide the parts they feed)."""
    algorithm, options, model = FAMILIES[family]
    validated = options_class(algorithm).model_validate(options)
    context = BuildContext(
        model=ModelConfig(hidden=8, **model), n_way=TRAINED_WAYS, image_size=IMAGE_SIZE
    )
    torch.manual_seed(0)
    meta_learner = build_learner(algorithm, validated, context)
    with torch.no_grad():
        for parameter in meta_learner.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return Learner(meta_learner.to(dtype), validated, TRAINED_WAYS, IMAGE_SIZE)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """uint8 [C*D, S, S]: per character a random pattern (30% ink), each of its D drawings
    with 5% of the pixels flipped."""
    generator = torch.Generator().manual_seed(0)
    size = (CHARACTERS, 1, IMAGE_SIZE, IMAGE_SIZE)
    patterns = torch.rand(size, generator=generator) < 0.3
    shape = (CHARACTERS, DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
    flips = torch.rand(shape, generator=generator) < 0.05
    return ((patterns ^ flips).to(torch.uint8) * 255).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def episode_index(n_way: int, k_shot: int, seed: int) -> EpisodeIndex:
    """EPISODES tasks of `n_way` distinct characters, K + QUERIES drawings each, rotated."""
    generator = torch.Generator().manual_seed(seed)
    characters = torch.stack(
        [torch.randperm(CHARACTERS, generator=generator)[:n_way] for _ in range(EPISODES)]
    )
    drawings = torch.rand(EPISODES, n_way, DRAWINGS, generator=generator).argsort(dim=2)
    image_index = characters.unsqueeze(-1) * DRAWINGS + drawings[:, :, : k_shot + QUERIES]
    rotation = torch.randint(0, 4, (EPISODES, n_way), generator=generator)
    return EpisodeIndex(image_index, rotation, characters, k_shot)


@pytest.fixture(scope="module")
def episode_sets() -> dict[str, EpisodeIndex]:
    return {
        setting: episode_index(n_way, k_shot, seed)
        for seed, (setting, (n_way, k_shot)) in enumerate(SETTINGS.items())
    }


@pytest.fixture
def uneven_chunks(monkeypatch):
    """Chunks of 3 episodes of 5w2s (25 images each: 3 + 3 + 1) and 6 of 3w1s (12 images:
    6 + 1) per `adapt_many` call."""
    monkeypatch.setattr(evaluation, "CHUNK_IMAGES", 75)


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: within 5e-5 of the logits' scale (their largest
    magnitude, at least 1). Features go through four convolutions in another summation
    order (module docstring), and distances and inner steps amplify that to a few 1e-6 of
    the scale; a pooled BatchNorm statistic or a shared adapted weight moves logits by
    1e-2 to 1 of it."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=5e-5 * scale)


def logits_both_ways(
    learner: Learner, images: torch.Tensor, index: EpisodeIndex, steps: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query logits [T, Q, N] of all episodes of `index`: through `adapt_many` in the
    chunks evaluation uses, and through `adapt` one episode at a time (the same random
    numbers for learners that draw some)."""
    episodes = materialize(images, index)
    per_call = episodes_per_call(index)
    torch.manual_seed(7)
    batched = torch.cat(
        [
            learner.adapt_many(chunk.support_x, chunk.support_y, steps).predict(chunk.query_x)
            for chunk in (episodes[s : s + per_call] for s in range(0, EPISODES, per_call))
        ]
    )
    torch.manual_seed(7)
    looped = torch.stack(
        [
            learner.adapt(episodes.support_x[t], episodes.support_y[t], steps).predict(
                episodes.query_x[t]
            )
            for t in range(EPISODES)
        ]
    )
    return batched, looped


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_evaluation_scores_every_episode_as_the_per_episode_loop(
    family, images, episode_sets, uneven_chunks
):
    learner = make_learner(family)
    assert learner.batches_tasks == (family in BATCHING)
    for setting, index in episode_sets.items():
        batched = evaluate_episode_set(learner, images, index, setting, seed=3, progress=False)
        looped = evaluate_episode_set(
            learner, images, index, setting, seed=3, progress=False, batch_tasks=False
        )

        assert batched.unsupported is None and looped.unsupported is None
        np.testing.assert_array_equal(batched.accuracy_after, looped.accuracy_after)
        assert (looped.accuracy_before is None) == (not learner.adapts_by_gradient)
        if learner.adapts_by_gradient:
            np.testing.assert_array_equal(batched.accuracy_before, looped.accuracy_before)
        assert batched.adaptation_steps == looped.adaptation_steps
        assert (batched.seconds > 0).all()
        per_call = episodes_per_call(index) if learner.batches_tasks else 1
        assert per_call == {"5w2s": 3, "3w1s": 6}[setting] or not learner.batches_tasks
        for start in range(0, EPISODES, per_call):  # a chunk's time, shared evenly
            assert len(set(batched.seconds[start : start + per_call])) == 1
        for steps in (None, 0) if learner.adapts_by_gradient else (None,):
            batched_logits, looped_logits = logits_both_ways(learner, images, index, steps)
            assert batched_logits.shape == (EPISODES, index.n_way * QUERIES, index.n_way)
            assert_float32_close(batched_logits, looped_logits)


@pytest.mark.parametrize(("family", "tasks_per_pass"), PASSES)
def test_batched_adaptation_matches_one_task_at_a_time_in_float64(
    family, tasks_per_pass, monkeypatch
):
    """The batched path computes the same function: in float64 it agrees with `adapt` on
    each task to 1e-10, after adaptation and before it, for the trained way count and a
    fresh 3-way head."""
    monkeypatch.setattr(embedding, "CPU_TASKS_PER_PASS", tasks_per_pass)
    meta_learner = make_learner(family, torch.float64).meta_learner
    generator = torch.Generator().manual_seed(4)
    for n_way in (TRAINED_WAYS, 3):
        shape = (5, 2 * n_way, 1, IMAGE_SIZE, IMAGE_SIZE)
        support_x = (torch.rand(shape, generator=generator) < 0.3).double()
        support_y = torch.arange(n_way).repeat_interleave(2).repeat(5, 1)
        query_x = (torch.rand(5, 3 * n_way, *shape[2:], generator=generator) < 0.3).double()
        for steps in (None, 0) if meta_learner.adapts_by_gradient else (None,):
            batched = meta_learner.adapt_many(support_x, support_y, steps)(query_x)
            looped = torch.stack(
                [
                    meta_learner.adapt(support_x[t], support_y[t], steps)(query_x[t])
                    for t in range(5)
                ]
            )
            torch.testing.assert_close(batched, looped, rtol=0, atol=1e-10)
            if steps is None or n_way == TRAINED_WAYS:  # (a fresh zero head predicts 0)
                assert batched.abs().max() > 1e-3  # not a vacuous comparison of zeros


@pytest.mark.parametrize(("family", "tasks_per_pass"), PASSES)
def test_a_task_is_not_affected_by_the_other_tasks_of_its_batch(
    family, tasks_per_pass, images, episode_sets, monkeypatch
):
    """Transductive BatchNorm normalises each task's support and query sets with their own
    statistics: replacing the second task's support or query images (by their inverse,
    very different statistics) leaves the first task's logits exactly as they were, and
    both equal the first task adapted alone. Pooling the statistics over the tasks of a
    chunk, or sharing adapted weights between them, fails this."""
    monkeypatch.setattr(embedding, "CPU_TASKS_PER_PASS", tasks_per_pass)
    learner = make_learner(family).meta_learner.eval()
    episodes = materialize(images, episode_sets["5w2s"][:3])
    support_x, support_y, query_x = episodes.support_x, episodes.support_y, episodes.query_x
    other_support = torch.stack([support_x[0], 1.0 - support_x[1], support_x[2]])
    other_query = torch.stack([query_x[0], 1.0 - query_x[1], query_x[2]])

    for steps in (None, 0) if learner.adapts_by_gradient else (None,):
        reference = learner.adapt_many(support_x, support_y, steps)(query_x)
        changed_support = learner.adapt_many(other_support, support_y, steps)(query_x)
        changed_query = learner.adapt_many(support_x, support_y, steps)(other_query)
        alone = learner.adapt(support_x[0], support_y[0], steps)(query_x[0])

        torch.testing.assert_close(changed_support[0], reference[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(changed_query[0], reference[0], rtol=0, atol=1e-6)
        assert_float32_close(reference[0], alone)
        # The second task did change (else the comparisons above would prove nothing);
        # before adaptation (0 steps) a gradient learner does not read its support set.
        if steps is None or not learner.adapts_by_gradient:
            assert not torch.allclose(changed_support[1], reference[1], atol=1e-3)
        assert not torch.allclose(changed_query[1], reference[1], atol=1e-3)


GRADIENT_LEARNERS = ("maml", "taml", "anil_task_encoder", "leo", "reptile")  # adapt by gradient
GRADIENT_BATCHING = [family for family in BATCHING if FAMILIES[family][0] in GRADIENT_LEARNERS]


@pytest.mark.parametrize("family", GRADIENT_BATCHING)
def test_before_and_after_from_one_call_are_adapt_many_with_0_and_with_steps(
    family, images, episode_sets
):
    """`Learner.adapt_before_after` (what evaluation calls for a batching gradient learner)
    gives exactly the logits of `adapt_many` with 0 steps and with the default steps, for
    the trained way count and another, through the chunks evaluation uses."""
    learner = make_learner(family)
    assert learner.adapts_by_gradient and learner.batches_tasks
    for index in episode_sets.values():
        episodes = materialize(images, index[:5])
        adapted = learner.adapt_before_after(episodes.support_x, episodes.support_y)
        before, after = adapted.predict(episodes.query_x)
        for logits, steps in ((before, 0), (after, None)):
            expected = learner.adapt_many(episodes.support_x, episodes.support_y, steps)
            torch.testing.assert_close(
                logits, expected.predict(episodes.query_x), rtol=0, atol=1e-6
            )
        assert not torch.allclose(before, after, atol=1e-3)  # adaptation did something


@pytest.mark.parametrize("family", ["anil", "anil_resnet18", "leo", "anil_task_encoder"])
def test_before_and_after_share_the_body_features(family, images, episode_sets, monkeypatch):
    """ANIL, LEO and ANIL with a task encoder adapt nothing in the body, so one call of
    `adapt_before_after` runs each support and each query image through the body once
    (scoring before and after separately ran them twice, or the queries twice)."""
    from metalab.algorithms import anil_task_encoder, task_forward

    learner = make_learner(family)
    seen = {"images": 0}

    def counting(module, wrapped):
        def body_features(model, x, *args, **kwargs):
            seen["images"] += x.shape[0] * x.shape[1]  # x [T, B, 1, H, W]
            return wrapped(model, x, *args, **kwargs)

        monkeypatch.setattr(module, "body_features", body_features)

    counting(task_forward, task_forward.body_features)
    counting(embedding, embedding.body_features)
    counting(anil_task_encoder, anil_task_encoder.body_features)
    episodes = materialize(images, episode_sets["5w2s"][:5])
    adapted = learner.adapt_before_after(episodes.support_x, episodes.support_y)
    adapted.predict(episodes.query_x)
    images_per_task = episodes.support_x.shape[1] + episodes.query_x.shape[1]
    assert seen["images"] == 5 * images_per_task


def test_episodes_per_call_fills_the_image_budget():
    def index(n_way: int, k_shot: int, queries: int, tasks: int = 600) -> EpisodeIndex:
        image_index = torch.zeros(tasks, n_way, k_shot + queries, dtype=torch.int64)
        zeros = torch.zeros(tasks, n_way, dtype=torch.int64)
        return EpisodeIndex(image_index, zeros, zeros, k_shot)

    assert evaluation.CHUNK_IMAGES == 2000
    assert episodes_per_call(index(20, 5, 15)) == 5  # 400 images per episode
    assert episodes_per_call(index(20, 1, 15)) == 6
    assert episodes_per_call(index(5, 5, 15)) == 20
    assert episodes_per_call(index(5, 1, 15)) == 25
    assert episodes_per_call(index(2, 1, 1)) == evaluation.TASK_CHUNK  # at most a chunk
    assert episodes_per_call(index(100, 20, 20)) == 1  # at least one


def test_adapt_many_checks_its_inputs_in_one_line():
    learner = make_learner("protonets")
    generator = torch.Generator().manual_seed(0)
    support_x = torch.rand(2, 6, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    support_y = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]])
    query_x = torch.rand(2, 4, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    adapted = learner.adapt_many(support_x, support_y.tolist())
    assert adapted.predict(query_x).shape == (2, 4, 3)
    cases = [
        (lambda: learner.adapt_many(support_x[0], support_y), r"support_x must have shape \[T,"),
        (lambda: learner.adapt_many(support_x, support_y[:1]), "one row of labels per task"),
        (
            lambda: learner.adapt_many(support_x, torch.tensor([[0, 0, 1, 1, 2, 2], [0, 2] * 3])),
            "every class present",
        ),
        (
            lambda: learner.adapt_many(support_x, torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1] * 3])),
            r"same way count, got \[2, 3\]",
        ),
        (lambda: learner.adapt_many(support_x * 2, support_y), "outside"),
        (lambda: adapted.predict(query_x[:1]), r"query_x must have shape \[2, B, 1, 16, 16\]"),
        (lambda: learner.adapt_many(support_x, support_y, steps=-1), "steps must be >= 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)


def test_adapt_many_reports_a_task_shape_the_learner_cannot_do():
    learner = make_learner("cavia")  # trained 5-way; CAVIA cannot add output classes
    support_x = torch.rand(2, 7, 1, IMAGE_SIZE, IMAGE_SIZE)
    support_y = torch.arange(7).repeat(2, 1)
    with pytest.raises(UnsupportedTaskError, match="cannot handle a 7-way task"):
        learner.adapt_many(support_x, support_y)


def test_a_learner_must_implement_adapt_or_adapt_many():
    class Neither(MetaLearner):
        pass

    with pytest.raises(NotImplementedError, match="implements neither adapt nor adapt_many"):
        Neither().adapt(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))


def test_anil_resnet18_runs_its_body_channels_last_at_test_time_only(monkeypatch):
    """Test-time adaptation hands ResNet18 its convolution weights channels-last (one input
    channel: only the weights' layout selects PyTorch's faster channels-last kernels),
    training keeps them as they are; both compute the same features (float64: 1e-10)."""
    from metalab.algorithms import task_forward
    from metalab.algorithms.base import TrainProgress
    from metalab.data.episodes import Episodes

    learner = make_learner("anil_resnet18", torch.float64).meta_learner
    layouts = []
    original = task_forward.module_features

    def recording(model, params, x, masks=None):
        # (a one-input-channel weight is contiguous in both layouts: look at another)
        weight = next(p for p in params.values() if p.dim() == 4 and p.shape[1] > 1)
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last))
        return original(model, params, x, masks)

    monkeypatch.setattr(task_forward, "module_features", recording)
    generator = torch.Generator().manual_seed(5)
    x = (torch.rand(2, 10, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) < 0.3).double()
    y = torch.arange(5).repeat_interleave(2).repeat(2, 1)
    learner.adapt_before_after(x, y)(x)
    assert layouts and all(layouts)

    layouts.clear()
    episodes = Episodes(x, y, x, y)
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert layouts and not any(layouts)

    plain = task_forward.body_features(learner.model, x, None, "fp32", False, True)
    fast = task_forward.body_features(learner.model, x, None, "fp32", False, True, True)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-10)
