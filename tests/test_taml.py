"""TAML (Jamal & Qi 2019): the entropy and inequality regularisers against hand-computed
values, meta-gradients against finite differences, training progress, determinism,
options and model files. The seed project's "TAML" (once ``variant: encoder``) is ANIL with
a task encoder: tests/test_anil_task_encoder.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
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

from metalab.algorithms import taml
from metalab.algorithms.base import TrainProgress
from metalab.algorithms.maml import MAMLLearner
from metalab.algorithms.maml import Options as MAMLOptions
from metalab.algorithms.taml import (
    Options,
    generalized_entropy_index,
    gini_coefficient,
    prediction_entropy,
    theil_index,
)
from metalab.learner_api import learner_from_payload
from metalab.params import ParamsError, validate_params

VARIANTS = {
    "entropy": {"variant": "entropy"},
    "theil": {"variant": "inequality"},
}


def build(n_way: int = 5, seed: int = 0, **options) -> MAMLLearner:
    """A TAML learner on the small synthetic Conv4 (8 channels, 16x16 images)."""
    torch.manual_seed(seed)
    options.setdefault("inner_lr", 0.4)
    return taml.build(Options(**options), build_context(n_way=n_way))


def small_episodes(num_tasks: int = 3, n_way: int = 3, queries: int = 2, seed: int = 2):
    return sample_episodes(class_patterns(24, seed=1), num_tasks, n_way, 1, queries, seed=seed)


# ------------------------------------------------------------------ regularisers
LOSSES = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def test_inequality_measures_equal_hand_computed_values():
    # mu = 2, ratios l/mu = 0.5, 1, 1.5.
    # Theil: (0.5 ln 0.5 + 1 ln 1 + 1.5 ln 1.5) / 3 = (-0.346574 + 0 + 0.608198) / 3 = 0.087208
    assert theil_index(LOSSES).item() == pytest.approx(0.0872080, abs=1e-6)
    # GE(2): ((0.25 - 1) + (1 - 1) + (2.25 - 1)) / (3 * 2 * 1) = 0.5 / 6
    assert generalized_entropy_index(LOSSES, 2.0).item() == pytest.approx(0.5 / 6)
    # GE(0), mean log deviation: -(ln 0.5 + ln 1 + ln 1.5) / 3 = 0.287682 / 3 = 0.095894
    assert generalized_entropy_index(LOSSES, 0.0).item() == pytest.approx(0.0958940, abs=1e-6)
    # GE(1) is the Theil index, and GE(alpha) tends to it as alpha -> 1.
    assert generalized_entropy_index(LOSSES, 1.0).item() == theil_index(LOSSES).item()
    assert generalized_entropy_index(LOSSES, 1.0001).item() == pytest.approx(0.087208, abs=1e-4)
    # Gini: sum_ij |l_i - l_j| = 2 (1 + 2 + 1) = 8, over 2 n^2 mu = 2 * 9 * 2 = 36.
    assert gini_coefficient(LOSSES).item() == pytest.approx(8 / 36)


@pytest.mark.parametrize(
    "measure",
    [theil_index, gini_coefficient, lambda x: generalized_entropy_index(x, 2.0)],
    ids=["theil", "gini", "ge2"],
)
def test_inequality_is_zero_for_equal_losses_and_finite_at_zero_losses(measure):
    assert measure(torch.full((4,), 0.7, dtype=torch.float64)).item() == pytest.approx(0, abs=1e-15)
    # One task carrying all the loss is the most unequal meta-batch.
    assert measure(torch.tensor([0.0, 0.0, 0.0, 2.0])) > measure(torch.tensor([0.1, 0.5, 1, 2.0]))
    losses = torch.tensor([0.0, 1e-12, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    value = measure(losses)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(losses.grad).all()


def test_prediction_entropy_hand_value_and_maximum_at_uniform_predictions():
    # Logits [0, ln 3] -> p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762.
    two_class = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert prediction_entropy(two_class).item() == pytest.approx(0.5623351, abs=1e-6)
    uniform = torch.full((2, 4, 5), 3.0)  # [T, Q, N]: any constant row is uniform
    torch.testing.assert_close(prediction_entropy(uniform), torch.full((2,), math.log(5)))
    random = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    assert (prediction_entropy(random) < math.log(5)).all()


def test_entropy_terms_reward_uniform_initial_and_confident_adapted_predictions():
    learner = build(entropy_weight=0.5, adapted_entropy_weight=0.2)
    uniform = torch.zeros(3, 4, 5, dtype=torch.float64)  # [T, Q, N]
    confident = torch.tensor([9.0, 0, 0, 0, 0], dtype=torch.float64).expand(3, 4, 5)
    # Uniform before and after: -0.5 ln 5 + 0.2 ln 5 per task.
    torch.testing.assert_close(
        learner.task_regularisers(uniform, uniform),
        torch.full((3,), -0.3 * math.log(5), dtype=torch.float64),
    )
    # The best case: uniform before (H = ln 5), one-hot-like after (H ~ 0).
    best = learner.task_regularisers(uniform, confident)
    assert (best < -0.5 * math.log(5) + 1e-2).all()
    assert (learner.task_regularisers(confident, uniform) > best).all()


def test_inequality_meta_loss_is_mean_adapted_loss_plus_weighted_measure_of_the_other():
    # Mean of the adapted losses; inequality of the measured (initial) losses.
    adapted = torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64)
    theil = build(variant="inequality", inequality_weight=2.0)
    assert theil.meta_loss(adapted, LOSSES).item() == pytest.approx(1 + 2 * 0.0872080)
    gini = build(variant="inequality", inequality="gini", inequality_weight=1.0)
    assert gini.meta_loss(adapted, LOSSES).item() == pytest.approx(1 + 8 / 36)
    # The pre-2026-12-03 reading: both terms from the adapted losses.
    old = build(variant="inequality", inequality_weight=2.0, inequality_losses="adapted_query")
    assert old.combine_task_losses(LOSSES, []).item() == pytest.approx(2 + 2 * 0.0872080)


@pytest.mark.parametrize("variant", ["entropy", "theil"])
def test_reported_meta_loss_matches_an_independent_computation(variant: str):
    weights = {"entropy_weight": 0.5} if variant == "entropy" else {}
    learner = build(n_way=3, **weights, **VARIANTS[variant]).double()
    maml_learner = MAMLLearner(copy.deepcopy(learner.model), 3, MAMLOptions(inner_lr=0.4))
    episodes = as_float64(small_episodes(num_tasks=3))
    stats = learner.meta_gradients(episodes, TrainProgress(0, 10))
    # Each task's adapted query loss, by plain MAML one task at a time.
    losses = torch.tensor(
        [
            maml_learner.meta_gradients(episodes.task(t), TrainProgress(0, 10)).loss
            for t in range(3)
        ],
        dtype=torch.float64,
    )
    if variant == "entropy":
        # Un-adapted network on each task's query set, straight through the nn.Module.
        with torch.no_grad():
            entropies = torch.stack(
                [prediction_entropy(learner.model(x)) for x in episodes.query_x]
            )
        expected = losses.mean() - 0.5 * entropies.mean()
        assert stats.extra["initial_entropy"] == pytest.approx(entropies.mean().item(), rel=1e-10)
    else:
        # The paper's inequality term: of the un-adapted network's support losses.
        with torch.no_grad():
            initial = torch.stack(
                [
                    F.cross_entropy(learner.model(x), y)
                    for x, y in zip(episodes.support_x, episodes.support_y, strict=True)
                ]
            )
        expected = losses.mean() + 0.1 * theil_index(initial)
        assert stats.extra["inequality"] == pytest.approx(theil_index(initial).item(), rel=1e-10)
    assert stats.loss == pytest.approx(losses.mean().item(), rel=1e-10)
    assert stats.extra["meta_loss"] == pytest.approx(expected.item(), rel=1e-10)


def two_task_losses(learner: MAMLLearner, episodes) -> dict[str, torch.Tensor]:
    """Independently of the TAML code, float64 [2] per source: the un-adapted network's
    cross-entropy on each task's support and query set (straight through the nn.Module)
    and the adapted query loss (plain MAML, one task at a time)."""
    maml_learner = MAMLLearner(copy.deepcopy(learner.model), 3, MAMLOptions(inner_lr=0.4))
    with torch.no_grad():

        def initial(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [F.cross_entropy(learner.model(xt), yt) for xt, yt in zip(x, y, strict=True)]
            )

        losses = {
            "initial_support": initial(episodes.support_x, episodes.support_y),
            "initial_query": initial(episodes.query_x, episodes.query_y),
        }
    losses["adapted_query"] = torch.tensor(
        [maml_learner.meta_gradients(episodes.task(t), TrainProgress(0, 10)).loss for t in (0, 1)],
        dtype=torch.float64,
    )
    return losses


def two_task_theil(losses: torch.Tensor) -> float:
    """The Theil index of two losses by hand: mu = (l1 + l2) / 2, (1/2) sum (l/mu) ln(l/mu)."""
    first, second = losses.tolist()
    mu = (first + second) / 2
    return 0.5 * sum(value / mu * math.log(value / mu) for value in (first, second))


@pytest.mark.parametrize("source", ["initial_support", "initial_query", "adapted_query"])
def test_inequality_is_measured_on_exactly_the_losses_the_option_names(source: str):
    # Jamal & Qi, Algorithm 2, line 10: lambda I({L_Ti(f_theta)}), the initial model's
    # losses (default: on the support samples of lines 5-7), not the adapted ones.
    options = {"inequality_losses": source} if source != "initial_support" else {}
    learner = build(n_way=3, variant="inequality", inequality_weight=0.5, **options).double()
    episodes = as_float64(small_episodes(num_tasks=2))
    losses = two_task_losses(learner, episodes)
    theils = {name: two_task_theil(values) for name, values in losses.items()}
    # The three sources give clearly different indices, so only the right one matches.
    values = sorted(theils.values())
    assert min(b - a for a, b in zip(values, values[1:], strict=False)) > 1e-4, theils
    stats = learner.meta_gradients(episodes, TrainProgress(0, 10))
    assert stats.extra["inequality"] == pytest.approx(theils[source], rel=1e-9)
    assert stats.extra["measured_loss"] == pytest.approx(losses[source].mean().item(), rel=1e-9)
    expected = losses["adapted_query"].mean().item() + 0.5 * theils[source]
    assert stats.extra["meta_loss"] == pytest.approx(expected, rel=1e-9)
    assert stats.loss == pytest.approx(losses["adapted_query"].mean().item(), rel=1e-9)


@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_gradient_of_the_inequality_term_matches_finite_differences(vectorise: bool):
    """First order, the MAML part of the meta-gradient is the same with and without the
    term, so the difference of the two is lambda grad I(initial support losses), which
    must match central differences of the Theil index of the nn.Module's support losses
    (float64), for body, BatchNorm and head parameters."""
    episodes = as_float64(small_episodes(num_tasks=3))
    grads = []
    for weight in (2.0, 0.0):
        learner = build(
            n_way=3,
            variant="inequality",
            inequality_weight=weight,
            first_order=True,
            inner_steps=2,
            vectorise_tasks=vectorise,
        ).double()
        learner.meta_gradients(episodes, TrainProgress(0, 10))
        grads.append({name: p.grad.clone() for name, p in learner.model.named_parameters()})

    def term() -> torch.Tensor:
        losses = [
            F.cross_entropy(learner.model(x), y)
            for x, y in zip(episodes.support_x, episodes.support_y, strict=True)
        ]
        return 2.0 * theil_index(torch.stack(losses))

    generator = torch.Generator().manual_seed(3)
    for name in (
        "body.0.0.weight",
        "body.1.1.weight",
        "body.3.0.weight",
        "head.weight",
        "head.bias",
    ):
        parameter = learner.model.get_parameter(name)
        indices = torch.randint(parameter.numel(), (3,), generator=generator)
        analytic = (grads[0][name] - grads[1][name]).view(-1)[indices]
        with torch.no_grad():
            numeric = central_differences(term, parameter, indices)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9, msg=name)
        assert analytic.abs().max() > 1e-6, name  # the term does reach this parameter


# ---------------------------------------------------------------- meta-gradients
FINITE_DIFFERENCE_CASES = {
    "entropy": {"entropy_weight": 0.5, "adapted_entropy_weight": 0.2},
    "theil": {"variant": "inequality", "inequality_weight": 2.0},
    "theil_loop": {"variant": "inequality", "inequality_weight": 2.0, "vectorise_tasks": False},
    "theil_initial_query": {
        "variant": "inequality",
        "inequality_weight": 2.0,
        "inequality_losses": "initial_query",
    },
    "theil_adapted_query": {
        "variant": "inequality",
        "inequality_weight": 2.0,
        "inequality_losses": "adapted_query",
    },
    "theil_anil_dropout": {
        "variant": "inequality",
        "inequality_weight": 2.0,
        "adapt_parameters": "head",
        "task_dropout_rates": [0.2, 0.0, 0.1, 0.0],
    },
    "generalized_entropy": {
        "variant": "inequality",
        "inequality": "generalized_entropy",
        "generalized_entropy_alpha": 0.5,
        "inequality_weight": 2.0,
    },
}
CHECKED_PARAMETERS = (
    "body.0.0.weight",
    "body.2.1.weight",
    "head.weight",
    "head.bias",
)


@pytest.mark.parametrize("case", list(FINITE_DIFFERENCE_CASES))
def test_second_order_meta_gradient_matches_central_differences(case: str):
    learner = build(n_way=3, inner_lr=0.3, inner_steps=2, **FINITE_DIFFERENCE_CASES[case])
    learner = learner.double()
    episodes = as_float64(small_episodes())
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same task dropout masks in every evaluation
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
            torch.manual_seed(5)
            stats = learner.meta_gradients(episodes, TrainProgress(0, 10))
            return torch.tensor(stats.extra["meta_loss"], dtype=torch.float64)

        numeric = central_differences(meta_loss, parameter, indices)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8, msg=name)
        checked += 1
    assert checked == 4


def test_first_order_taml_differs_from_second_order_only_in_the_inner_steps():
    episodes = small_episodes()
    results = []
    for first_order in (False, True):
        learner = build(variant="inequality", first_order=first_order)
        results.append(learner.meta_gradients(episodes, TrainProgress(0, 10)))
    # Same forward computation, so the same meta-loss; the gradients differ.
    assert results[0].extra["meta_loss"] == pytest.approx(results[1].extra["meta_loss"])
    assert results[0].extra["second_order"] == 1.0 and results[1].extra["second_order"] == 0.0


# ----------------------------------------------------------------- training runs
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_dozen_meta_steps_reduce_the_held_out_loss(variant: str):
    learner = build(seed=0, head_init="zeros", **VARIANTS[variant])
    before, after, losses = held_out_losses_around_training(learner, steps=30)
    assert after < 0.6 * before, (before, after)  # measured: 0.36, 0.37, 0.26
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_seed_gives_identical_parameters(variant: str):
    states = []
    for _ in range(2):
        learner = build(seed=5, task_dropout_rates=[0.1, 0.1, 0.1, 0.1], **VARIANTS[variant])
        meta_train(learner, class_patterns(12, seed=3), steps=3, seed=0)
        states.append(learner.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.filterwarnings("ignore:precision bf16")  # emulated-bf16 CPUs warn
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_meta_gradients_are_finite(variant: str):
    torch.manual_seed(0)
    learner = taml.build(Options(**VARIANTS[variant]), build_context(precision="bf16"))
    stats = learner.meta_gradients(small_episodes(n_way=5), TrainProgress(0, 1))
    assert math.isfinite(stats.extra["meta_loss"])
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.grad is not None)


# ------------------------------------------------------------- options and files
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variant": "inequality", "entropy_weight": 0.5}, "applies only to variant 'entropy'"),
        ({"variant": "encoder"}, "'entropy' or 'inequality'"),  # anil_task_encoder now
        ({"variant": "inequality", "generalized_entropy_alpha": 3.0}, "'generalized_entropy'"),
        ({"variant": "inequality", "inequality": "atkinson"}, "theil"),
        ({"inequality_losses": "initial_query"}, "applies only to variant 'inequality'"),
        ({"variant": "inequality", "inequality_losses": "after"}, "initial_support"),
        ({"variant": "inequality", "zero_head": True}, "inequality_losses must be adapted_query"),
        ({"variant": "entropy", "zero_head": True}, "set entropy_weight 0"),
        ({"lambda": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_options_reject_what_the_variant_does_not_use(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        Options(**options)


def test_options_round_trip_and_params_errors_name_the_key():
    for variant in VARIANTS.values():
        options = Options(**variant)
        assert Options.model_validate(options.model_dump()) == options
    raw = {"experiments": {"t": {"algorithm": "taml", "options": {"variant": "inequality"}}}}
    raw["experiments"]["t"]["options"]["entropy_weight"] = 0.3
    with pytest.raises(ParamsError, match=r"experiments\.t\.options\.entropy_weight = 0\.3"):
        validate_params(raw)


@pytest.mark.parametrize("variant", ["theil"])
def test_model_file_round_trip_and_other_way_counts(variant: str):
    options = {**VARIANTS[variant], "test_inner_steps": 2}
    payload, original = trainer_like_payload("taml", options)
    learner = learner_from_payload(payload)
    assert type(learner.meta_learner) is type(original)
    assert learner.adapts_by_gradient and learner.default_adaptation_steps == 2
    support_x, support_y, query_x = task(5)
    expected = original.eval().adapt(support_x, support_y)(query_x)
    torch.testing.assert_close(learner.adapt(support_x, support_y).predict(query_x), expected)
    support_x, support_y, query_x = task(3, k_shot=1, queries=4)
    assert learner.adapt(support_x, support_y).predict(query_x).shape == (12, 3)
