"""The zeroing trick (``zero_head``; Kao, Chiu & Chen, ICLR 2022): every task's inner loop,
in training and at test, starts from a zero linear head. Checked: identical logits for
every class before adaptation (query loss exactly ln N), no meta-gradient and no optimizer
group for the head, what the first inner step moves, meta-gradients against finite
differences and an independent first-order computation, the vectorised path against the
loop, batched evaluation against the per-episode loop, the meta device, and options."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_batched_evaluation import (  # noqa: F401 (fixtures)
    EPISODES,
    IMAGE_SIZE,
    QUERIES,
    TRAINED_WAYS,
    assert_float32_close,
    episode_sets,
    images,
    logits_both_ways,
    uneven_chunks,
)
from test_device import (  # noqa: F401 (fixtures)
    META,
    Case,
    autocast_calls,
    check_gradients_and_logits,
    meta_host_reads,
    run_on,
)
from test_device import build as build_case
from test_maml import adam_for, assert_same_gradients, make_episodes, make_learner

from metalab.algorithms import maml
from metalab.algorithms.base import BuildContext, TrainProgress
from metalab.algorithms.maml import MAMLLearner, Options
from metalab.algorithms.registry import build_learner
from metalab.evaluation import evaluate_episode_set
from metalab.learner_api import Learner
from metalab.models.config import ModelConfig
from metalab.training import count_parameters

CASES = {
    "fomaml": {"first_order": True, "inner_steps": 2},
    "maml": {"inner_steps": 2},
    "anil": {"adapt_parameters": "head", "inner_steps": 2},
    "meta_sgd": {"inner_lr_mode": "per_parameter", "inner_steps": 2},
}


def zero_head_learner(
    case: str = "fomaml", learner_class: type[MAMLLearner] = MAMLLearner, **options
) -> MAMLLearner:
    """A float64 learner with ``zero_head`` whose stored head is then made nonzero: the
    inner loop must not read it."""
    options = {**CASES[case], **options}
    learner = make_learner(learner_class=learner_class, zero_head=True, **options)
    with torch.no_grad():
        learner.model.head.weight.normal_(0, 1.0)
        learner.model.head.bias.normal_(0, 1.0)
    return learner


class PreAdaptationLogits(MAMLLearner):
    """Keeps the un-adapted query logits the MAML core computes (as TAML asks for them)."""

    needs_pre_adaptation_logits = True

    def combine_task_losses(self, query_losses, pre_adaptation_logits):
        self.pre_adaptation_logits = [logits.detach() for logits in pre_adaptation_logits]
        return query_losses.mean()


# ------------------------------------------------------------- the unbiased start
@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_class_starts_from_the_same_logits_in_training_and_at_test(case, vectorise):
    learner = zero_head_learner(case, PreAdaptationLogits, vectorise_tasks=vectorise)
    episodes = make_episodes(num_tasks=3, n_way=3, queries=2)
    learner.meta_gradients(episodes, TrainProgress(0, 10))
    assert len(learner.pre_adaptation_logits) == 3
    for logits in learner.pre_adaptation_logits:  # [Q, N]: zero, hence equal per class
        assert torch.equal(logits, torch.zeros_like(logits))
    # At test, 0 steps: the same start; the query loss is exactly ln N.
    before = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=0)
    logits = before(episodes.query_x[0])
    assert torch.equal(logits, torch.zeros_like(logits))
    loss = F.cross_entropy(logits, episodes.query_y[0])
    assert loss.item() == pytest.approx(math.log(3), rel=1e-15)
    # Without the trick the (nonzero) stored head biases the classes.
    plain = MAMLLearner(copy.deepcopy(learner.model), 3, Options(**CASES[case])).double()
    biased = plain.adapt(episodes.support_x[0], episodes.support_y[0], steps=0)
    assert not torch.allclose(biased(episodes.query_x[0]), logits)


@pytest.mark.parametrize("case", list(CASES))
def test_adaptation_moves_the_head_and_the_first_step_only_the_head(monkeypatch, case):
    """From a zero head the support loss has no gradient in the body (d logits / d features
    is the head), so step 1 moves only the head weight (the bias gradient, the class
    average of softmax - one-hot, is 1/N - 1/N = 0 on a class-balanced support set from
    uniform predictions); step 2 moves the body and the bias too (MAML)."""
    trajectories = []
    original = maml.inner_loop

    def recording(*args, **kwargs):
        trajectories.append(original(*args, **kwargs))
        return trajectories[-1]

    monkeypatch.setattr(maml, "inner_loop", recording)
    learner = zero_head_learner(case, vectorise_tasks=False)
    episodes = make_episodes(num_tasks=2)
    learner.meta_gradients(episodes, TrainProgress(0, 10))
    learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=2)(episodes.query_x[0])
    assert len(trajectories) == 3  # two training tasks, one test-time adaptation
    for theta_0, theta_1, theta_2 in trajectories:
        for name in ("head.weight", "head.bias"):
            assert torch.equal(theta_0[name], torch.zeros_like(theta_0[name]))
        assert theta_1["head.weight"].abs().max() > 1e-4  # adaptation changes the head
        torch.testing.assert_close(theta_1["head.bias"], theta_0["head.bias"], rtol=0, atol=1e-15)
        assert (theta_2["head.bias"] - theta_1["head.bias"]).abs().max() > 1e-6
        body = [name for name in theta_0 if name.startswith("body.")]
        assert all(torch.equal(theta_1[name], theta_0[name]) for name in body)
        if case != "anil" and body:
            assert not torch.equal(theta_2["body.1.0.weight"], theta_1["body.1.0.weight"])


# ----------------------------------------------------------- the head's outer update
@pytest.mark.parametrize("case", list(CASES))
def test_head_gets_no_meta_gradient_no_optimizer_state_and_stays_zero(case):
    learner = make_learner(zero_head=True, **CASES[case])
    assert torch.equal(learner.model.head.weight, torch.zeros_like(learner.model.head.weight))
    groups = learner.parameter_groups()
    in_groups = {name for group in groups for name in group["parameter_names"]}
    assert not any(name.startswith("head.") for name in in_groups)
    assert any(name.startswith("body.") for name in in_groups)
    if case == "meta_sgd":  # the head's inner lrs are still meta-learned
        assert {"inner_lr.head.weight", "inner_lr.head.bias"} <= in_groups
    head_size = sum(p.numel() for p in learner.model.head.parameters())
    plain = make_learner(**CASES[case])
    assert count_parameters(learner)[1] == count_parameters(plain)[1] - head_size

    optimizer = adam_for(learner, 0.01, 0)
    body_before = learner.model.body[0][0].weight.detach().clone()
    for iteration in range(2):
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(make_episodes(seed=iteration), TrainProgress(iteration, 10))
        assert learner.model.head.weight.grad is None and learner.model.head.bias.grad is None
        optimizer.step()
    assert not torch.equal(learner.model.body[0][0].weight, body_before)
    assert learner.model.head.weight.abs().max() == 0 and learner.model.head.bias.abs().max() == 0


@pytest.mark.parametrize("case", ["maml", "meta_sgd", "anil"])
def test_second_order_meta_gradient_matches_finite_differences(case):
    learner = zero_head_learner(case)
    episodes = make_episodes()
    learner.zero_grad(set_to_none=True)
    learner.meta_gradients(episodes, TrainProgress(0, 10))
    grads = {n: p.grad.clone() for n, p in learner.named_meta_parameters() if p.grad is not None}
    checked = 0
    generator = torch.Generator().manual_seed(1)
    for name, parameter in learner.named_meta_parameters():
        if not name.startswith(("body.1.0", "body.3.1", "inner_lr.head", "inner_lr.body.2")):
            continue
        if name.endswith(".0.bias"):  # a conv bias ahead of BatchNorm: gradient 0
            continue
        index = int(torch.randint(parameter.numel(), (1,), generator=generator))
        flat = parameter.data.view(-1)
        original = flat[index].item()
        values = []
        for shift in (1e-6, -1e-6):
            flat[index] = original + shift
            values.append(learner.meta_gradients(episodes, TrainProgress(0, 10)).extra["meta_loss"])
        flat[index] = original
        numeric = (values[0] - values[1]) / 2e-6
        assert grads[name].view(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)
        checked += 1
    assert checked >= 2
    # The stored head is irrelevant: changing it changes no meta-loss.
    reference = learner.meta_gradients(episodes, TrainProgress(0, 10)).extra["meta_loss"]
    with torch.no_grad():
        learner.model.head.weight.add_(1.0)
    assert learner.meta_gradients(episodes, TrainProgress(0, 10)).extra["meta_loss"] == reference


@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_first_order_meta_gradient_is_query_gradient_after_sgd_from_a_zero_head(vectorise):
    learner = zero_head_learner("fomaml", vectorise_tasks=vectorise)
    episodes = make_episodes(num_tasks=3)
    learner.zero_grad(set_to_none=True)
    learner.meta_gradients(episodes, TrainProgress(0, 10))
    expected = {n: torch.zeros_like(p) for n, p in learner.model.named_parameters()}
    for task in range(3):
        network = copy.deepcopy(learner.model)
        with torch.no_grad():
            network.head.weight.zero_()
            network.head.bias.zero_()
        sgd = torch.optim.SGD(network.parameters(), lr=learner.options.inner_lr)
        for _ in range(2):
            sgd.zero_grad()
            F.cross_entropy(
                network(episodes.support_x[task].double()), episodes.support_y[task]
            ).backward()
            sgd.step()
        sgd.zero_grad()
        F.cross_entropy(network(episodes.query_x[task].double()), episodes.query_y[task]).backward()
        for name, p in network.named_parameters():
            expected[name] += p.grad / 3
    for name, p in learner.model.named_parameters():
        if name.startswith("head."):
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["fomaml", "maml", "meta_sgd"])
def test_vectorised_path_equals_per_task_loop(case):
    episodes = make_episodes(num_tasks=3)
    results = []
    for vectorise in (False, True):
        learner = zero_head_learner(case, vectorise_tasks=vectorise, task_chunk_size=2)
        learner.zero_grad(set_to_none=True)
        stats = learner.meta_gradients(episodes, TrainProgress(0, 10))
        grads = {
            n: p.grad.clone() for n, p in learner.named_meta_parameters() if p.grad is not None
        }
        results.append((stats, grads))
    assert results[0][0].loss == pytest.approx(results[1][0].loss, rel=1e-12)
    assert_same_gradients(results[0][1], results[1][1])


# -------------------------------------------------------------------------- testing
FAMILIES = {
    "fomaml_zero_head": ({"test_inner_steps": 2, "first_order": True, "zero_head": True}, {}),
    "anil_zero_head": ({"test_inner_steps": 3, "adapt_parameters": "head", "zero_head": True}, {}),
    "metasgd_zero_head": (
        {"test_inner_steps": 2, "inner_lr_mode": "per_parameter", "zero_head": True},
        {"downsample": "stride"},
    ),
    "maml_loop_zero_head": (
        {"test_inner_steps": 2, "vectorise_tasks": False, "zero_head": True},
        {"downsample": "stride"},
    ),
}


def evaluation_learner(family: str, dtype: torch.dtype = torch.float32) -> Learner:
    """As tests/test_batched_evaluation.py builds a learner: every parameter moved off its
    start (the stored head too, which the zeroing trick must ignore)."""
    options, model = FAMILIES[family]
    validated = Options.model_validate(options)
    context = BuildContext(ModelConfig(hidden=8, **model), TRAINED_WAYS, IMAGE_SIZE)
    torch.manual_seed(0)
    meta_learner = build_learner("maml", validated, context)
    with torch.no_grad():
        for parameter in meta_learner.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return Learner(meta_learner.to(dtype), validated, TRAINED_WAYS, IMAGE_SIZE)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_evaluation_predicts_as_the_per_episode_loop(
    family,
    images,  # noqa: F811 (fixture)
    episode_sets,  # noqa: F811 (fixture)
    uneven_chunks,  # noqa: F811 (fixture)
):
    learner = evaluation_learner(family)
    for setting, index in episode_sets.items():
        batched = evaluate_episode_set(learner, images, index, setting, seed=3, progress=False)
        looped = evaluate_episode_set(
            learner, images, index, setting, seed=3, progress=False, batch_tasks=False
        )
        np.testing.assert_array_equal(batched.accuracy_after, looped.accuracy_after)
        np.testing.assert_array_equal(batched.accuracy_before, looped.accuracy_before)
        # Before adaptation every class ties (logits 0): the argmax is class 0 everywhere.
        np.testing.assert_allclose(looped.accuracy_before, 1 / index.n_way, rtol=1e-6)
        for steps in (None, 0):
            batched_logits, looped_logits = logits_both_ways(learner, images, index, steps)
            assert batched_logits.shape == (EPISODES, index.n_way * QUERIES, index.n_way)
            assert_float32_close(batched_logits, looped_logits)
            if steps == 0:
                assert batched_logits.abs().max() == 0
            else:
                assert batched_logits.abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_adaptation_matches_one_task_at_a_time_in_float64(family):
    meta_learner = evaluation_learner(family, torch.float64).meta_learner
    generator = torch.Generator().manual_seed(4)
    for n_way in (TRAINED_WAYS, 3):
        shape = (5, 2 * n_way, 1, IMAGE_SIZE, IMAGE_SIZE)
        support_x = (torch.rand(shape, generator=generator) < 0.3).double()
        support_y = torch.arange(n_way).repeat_interleave(2).repeat(5, 1)
        query_x = (torch.rand(5, 3 * n_way, *shape[2:], generator=generator) < 0.3).double()
        batched_before, batched = meta_learner.adapt_before_after(support_x, support_y)(query_x)
        looped = torch.stack(
            [meta_learner.adapt(support_x[t], support_y[t])(query_x[t]) for t in range(5)]
        )
        torch.testing.assert_close(batched, looped, rtol=0, atol=1e-10)
        assert batched.abs().max() > 1e-3 and batched_before.abs().max() == 0


# ----------------------------------------------------------------- device, options
@pytest.mark.parametrize(
    "case",
    [
        Case("fomaml-zero-head", "maml", {"first_order": True, "zero_head": True}),
        Case("maml-loop-zero-head", "maml", {"vectorise_tasks": False, "zero_head": True}),
        Case("anil-zero-head", "maml", {"adapt_parameters": "head", "zero_head": True}),
        Case(
            "taml-theil-initial-query",
            "taml",
            {"variant": "inequality", "inequality_losses": "initial_query"},
        ),
        Case(
            "taml-theil-zero-head",
            "taml",
            {"variant": "inequality", "inequality_losses": "adapted_query", "zero_head": True},
        ),
    ],
    ids=lambda case: case.name,
)
def test_zero_head_and_taml_losses_stay_on_the_meta_device(
    case,
    meta_host_reads,  # noqa: F811 (fixture)
    autocast_calls,  # noqa: F811 (fixture)
):
    """The fresh zero head follows the model's device (no CPU tensor meets a meta one)."""
    learner = build_case(case).to(META)
    stats, logits = run_on(learner, case, META, meta_host_reads)
    check_gradients_and_logits(learner, case, logits, META)
    assert all(p.grad is None for p in learner.model.head.parameters()) == bool(
        case.options.get("zero_head")
    )


def test_options():
    assert Options().zero_head is False
    with pytest.raises(ValueError, match="outer_trainable 'head' would train nothing"):
        Options(zero_head=True, outer_trainable="head")
    assert Options(zero_head=True, outer_trainable="head_and_batchnorm").zero_head
    assert Options.model_validate(Options(zero_head=True).model_dump()).zero_head
