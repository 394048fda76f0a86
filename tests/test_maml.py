"""The MAML-family core: meta-gradients against finite differences and independent
computations, the vectorised path against the per-task loop, ANIL / S4 / S5 parameter
control, task dropout masks, test-time adaptation and a tiny end-to-end training run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import maml, task_forward, task_runner
from metalab.algorithms.base import BuildContext, TrainProgress, scheduled_lr
from metalab.algorithms.functional import inner_loop, multi_step_loss_weights
from metalab.algorithms.maml import MAMLLearner, Options
from metalab.data.episodes import Episodes
from metalab.models import Conv4, ModelConfig, ResNet18

SIZE = 16  # 16 -> 8 -> 4 -> 2 -> 1 through the four max-pooling blocks


def make_episodes(
    num_tasks: int = 2, n_way: int = 3, k_shot: int = 1, queries: int = 2, seed: int = 0
) -> Episodes:
    generator = torch.Generator().manual_seed(seed)

    def images(count: int) -> torch.Tensor:
        return torch.rand(num_tasks, count, 1, SIZE, SIZE, generator=generator)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(n_way).repeat_interleave(per_class).repeat(num_tasks, 1)

    return Episodes(
        images(n_way * k_shot), labels(k_shot), images(n_way * queries), labels(queries)
    )


def make_learner(
    n_way: int = 3, hidden: int = 4, seed: int = 0, learner_class=MAMLLearner, **options
) -> MAMLLearner:
    torch.manual_seed(seed)
    options.setdefault("inner_lr", 0.3)
    learner = learner_class(Conv4(n_way, SIZE, hidden=hidden), n_way, Options(**options))
    return learner.double()


def meta_gradients(learner: MAMLLearner, episodes: Episodes, iteration: int = 0):
    learner.zero_grad(set_to_none=True)
    stats = learner.meta_gradients(episodes, TrainProgress(iteration, 100))
    grads = {
        name: p.grad.clone() for name, p in learner.named_meta_parameters() if p.grad is not None
    }
    return stats, grads


def assert_same_gradients(first: dict, second: dict, rtol: float = 1e-9, atol: float = 1e-12):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------ meta-gradients
@pytest.mark.parametrize("second_order", [False, True])
def test_inner_loop_on_a_quadratic_matches_the_closed_form(second_order: bool):
    # L(theta) = 0.5 |theta - c|^2, so theta_K = c + (1 - lr)^K (theta_0 - c) and
    # d theta_K / d theta_0 = (1 - lr)^K with second derivatives, 1 without.
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    center = torch.randn(4, dtype=torch.float64)
    trajectory = inner_loop(
        {"theta": theta},
        ["theta"],
        lambda params, step: 0.5 * (params["theta"] - center).square().sum(),
        lambda name, step: 0.3,
        3,
        second_order,
    )
    assert len(trajectory) == 4 and trajectory[0]["theta"] is theta
    torch.testing.assert_close(trajectory[-1]["theta"], center + 0.7**3 * (theta - center))
    trajectory[-1]["theta"].sum().backward()
    expected = torch.full((4,), 0.7**3 if second_order else 1.0, dtype=torch.float64)
    torch.testing.assert_close(theta.grad, expected)


FINITE_DIFFERENCE_CASES = {
    "maml": {},
    "meta_sgd": {"inner_lr_mode": "per_parameter"},
    "maml++": {
        "inner_lr_mode": "per_layer_per_step",
        "per_step_batchnorm": True,
        "multi_step_loss": True,
        "multi_step_loss_iterations": 10,
    },
    "anil": {"adapt_parameters": "head"},
}


@pytest.mark.parametrize(
    "case, vectorise",
    [("maml", False), ("maml", True), ("meta_sgd", True), ("maml++", True), ("anil", False)],
)
def test_second_order_meta_gradient_matches_finite_differences(case: str, vectorise: bool):
    learner = make_learner(
        inner_steps=2, vectorise_tasks=vectorise, **FINITE_DIFFERENCE_CASES[case]
    )
    episodes = make_episodes()
    _, grads = meta_gradients(learner, episodes)
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for name, parameter in learner.named_meta_parameters():
        is_conv_bias = parameter.dim() == 1 and name.endswith(".0.bias")  # cancelled by BN
        if is_conv_bias or not (
            name.startswith(("body.0.0", "body.2.1", "head.", "inner_lr.body.1.0"))
            or name.endswith("step_offsets")
        ):
            continue
        for _ in range(1 if name.endswith("step_offsets") else 2):
            index = int(torch.randint(parameter.numel(), (1,), generator=generator))
            flat = parameter.data.view(-1)
            original = flat[index].item()
            values = []
            for shift in (1e-6, -1e-6):
                flat[index] = original + shift
                values.append(
                    learner.meta_gradients(episodes, TrainProgress(0, 100)).extra["meta_loss"]
                )
            flat[index] = original
            numeric = (values[0] - values[1]) / 2e-6
            analytic = grads[name].view(-1)[index].item()
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_first_order_meta_gradient_is_query_gradient_at_sgd_adapted_weights(vectorise: bool):
    learner = make_learner(inner_steps=2, first_order=True, vectorise_tasks=vectorise)
    episodes = make_episodes(num_tasks=3)
    _, grads = meta_gradients(learner, episodes)
    expected = {name: torch.zeros_like(p) for name, p in learner.model.named_parameters()}
    for task in range(episodes.num_tasks):
        # Independently: plain SGD on a copy of the network, then the query gradient there.
        network = copy.deepcopy(learner.model)
        sgd = torch.optim.SGD(network.parameters(), lr=learner.options.inner_lr)
        for _ in range(2):
            sgd.zero_grad()
            support_x = episodes.support_x[task].double()
            F.cross_entropy(network(support_x), episodes.support_y[task]).backward()
            sgd.step()
        sgd.zero_grad()
        query_loss = F.cross_entropy(
            network(episodes.query_x[task].double()), episodes.query_y[task]
        )
        query_loss.backward()
        for name, p in network.named_parameters():
            expected[name] += p.grad / episodes.num_tasks
    assert_same_gradients({n: g for n, g in grads.items()}, expected, rtol=1e-8, atol=1e-10)


EQUIVALENCE_CASES = {
    "maml": {},
    "fomaml": {"first_order": True, "inner_steps": 2},
    "per_step_batchnorm": {"per_step_batchnorm": True, "inner_steps": 2, "multi_step_loss": True},
    "meta_sgd_dropout": {
        "inner_lr_mode": "per_parameter",
        "inner_steps": 2,
        "task_dropout_rates": [0.2, 0.1, 0.0, 0.3],
    },
    "anil": {"adapt_parameters": "head", "inner_steps": 3},
}


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_vectorised_path_equals_per_task_loop(case: str):
    episodes = make_episodes(num_tasks=3)
    results = []
    for vectorise in (False, True):
        learner = make_learner(
            vectorise_tasks=vectorise, task_chunk_size=2, **EQUIVALENCE_CASES[case]
        )
        torch.manual_seed(7)  # the same meta-dropout masks on both paths
        results.append(meta_gradients(learner, episodes))
    (loop_stats, loop_grads), (vector_stats, vector_grads) = results
    assert loop_stats.loss == pytest.approx(vector_stats.loss, rel=1e-12)
    assert_same_gradients(loop_grads, vector_grads)


def test_meta_gradients_are_deterministic_given_the_seed():
    episodes = make_episodes()
    results = []
    for _ in range(2):
        learner = make_learner(task_dropout_rates=[0.3, 0.3, 0.3, 0.3])
        torch.manual_seed(3)
        results.append(meta_gradients(learner, episodes)[1])
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name])


@pytest.mark.parametrize("case", ["maml", "per_step_batchnorm", "meta_sgd_dropout", "anil"])
def test_task_parallel_threads_equal_the_per_task_loop_and_repeat_exactly(monkeypatch, case):
    """With two torch threads the vectorised path splits the chunks between two worker
    threads (each single-threaded); gradients still equal the loop's, reruns are bitwise
    identical, the caller's thread count is restored and existing .grad is added to."""
    episodes = make_episodes(num_tasks=5)
    shares = []
    original = task_runner.run_chunks_in_threads

    def recording(run, chunks, workers, inputs, num_tasks):
        shares.append((len(chunks), workers))
        return original(run, chunks, workers, inputs, num_tasks)

    monkeypatch.setattr(task_runner, "run_chunks_in_threads", recording)
    loop_learner = make_learner(vectorise_tasks=False, **EQUIVALENCE_CASES[case])
    torch.manual_seed(7)  # the same meta-dropout masks on every run
    loop_stats, loop_grads = meta_gradients(loop_learner, episodes)
    torch.set_num_threads(2)
    parallel = []
    for _ in range(2):
        learner = make_learner(task_chunk_size=2, **EQUIVALENCE_CASES[case])
        torch.manual_seed(7)
        parallel.append(meta_gradients(learner, episodes))
        assert torch.get_num_threads() == 2
    assert shares == [(3, 2), (3, 2)]  # 5 tasks in chunks of 2 -> 3 chunks, 2 threads
    stats, grads = parallel[0]
    assert loop_stats.loss == pytest.approx(stats.loss, rel=1e-12)
    assert loop_stats.accuracy == stats.accuracy
    assert_same_gradients(loop_grads, grads)
    for name in grads:
        assert torch.equal(grads[name], parallel[1][1][name]), name
    # .grad accumulates like backward(): a second call adds the same gradient again.
    torch.manual_seed(7)
    learner.meta_gradients(episodes, TrainProgress(0, 100))
    for name, p in learner.named_meta_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, 2 * grads[name], rtol=1e-12, atol=1e-15)


def test_task_parallel_is_off_for_one_thread_and_for_the_loop():
    torch.set_num_threads(2)
    assert make_learner().task_runner.workers(num_chunks=8) == 2
    assert make_learner().task_runner.workers(num_chunks=1) == 1
    assert make_learner(task_parallel=False).task_runner.workers(num_chunks=8) == 1
    assert make_learner(vectorise_tasks=False).task_runner.workers(num_chunks=8) == 1
    torch.set_num_threads(1)
    assert make_learner().task_runner.workers(num_chunks=8) == 1


# ----------------------------------------------------------------- MAML++ schedules
def test_multi_step_loss_weights_sum_to_one_and_anneal_to_the_last_step():
    previous = None
    for iteration in range(0, 120, 10):
        weights = multi_step_loss_weights(4, iteration, 100)
        assert weights.sum().item() == pytest.approx(1.0)
        assert (weights > 0).all() or iteration >= 100
        if previous is not None and iteration < 100:
            assert (weights[:-1] <= previous[:-1]).all() and weights[-1] >= previous[-1]
        previous = weights
    torch.testing.assert_close(
        multi_step_loss_weights(4, 0, 100), torch.full((4,), 0.25, dtype=torch.float64)
    )
    assert multi_step_loss_weights(4, 99, 100)[0].item() == pytest.approx(0.03 / 4)
    torch.testing.assert_close(
        multi_step_loss_weights(4, 100, 100), torch.tensor([0.0, 0, 0, 1], dtype=torch.float64)
    )


def test_multi_step_loss_uses_every_step_early_and_only_the_last_later():
    episodes = make_episodes()
    learner = make_learner(inner_steps=3, multi_step_loss=True, multi_step_loss_iterations=50)
    final_only = make_learner(inner_steps=3)
    early, late = (learner.meta_gradients(episodes, TrainProgress(i, 100)) for i in (0, 50))
    reference = final_only.meta_gradients(episodes, TrainProgress(0, 100))
    assert late.extra["meta_loss"] == pytest.approx(reference.extra["meta_loss"], rel=1e-12)
    assert early.extra["meta_loss"] != pytest.approx(reference.extra["meta_loss"], rel=1e-3)


def test_first_order_until_iteration_switches_the_derivative_order():
    episodes = make_episodes()
    annealed = make_learner(inner_steps=2, first_order_until_iteration=5)
    first_order = make_learner(inner_steps=2, first_order=True)
    second_order = make_learner(inner_steps=2)
    assert [annealed.second_order_at(i) for i in (0, 4, 5, 6)] == [False, False, True, True]
    assert_same_gradients(
        meta_gradients(annealed, episodes, 4)[1], meta_gradients(first_order, episodes)[1]
    )
    assert_same_gradients(
        meta_gradients(annealed, episodes, 5)[1], meta_gradients(second_order, episodes)[1]
    )
    difference = (
        meta_gradients(first_order, episodes)[1]["body.1.0.weight"]
        - meta_gradients(second_order, episodes)[1]["body.1.0.weight"]
    )
    assert difference.abs().max() > 1e-6  # the two orders really differ here


# ---------------------------------------------------------------- TAML extension
class WorstTaskLearner(MAMLLearner):
    """A non-mean aggregation (the hardest task only) that also asks for pre-adaptation
    logits, as TAML does."""

    needs_pre_adaptation_logits = True

    def combine_task_losses(self, query_losses, pre_adaptation_logits):
        self.received = (query_losses.detach().clone(), pre_adaptation_logits)
        return query_losses.max()


@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_combine_task_losses_override_gets_all_tasks_and_pre_adaptation_logits(vectorise: bool):
    episodes = make_episodes(num_tasks=3)
    learner = make_learner(
        learner_class=WorstTaskLearner, vectorise_tasks=vectorise, task_chunk_size=2
    )
    _, grads = meta_gradients(learner, episodes)
    query_losses, pre_logits = learner.received
    assert query_losses.shape == (3,) and len(pre_logits) == 3
    for task in range(3):
        # Un-adapted network on the task's query set, straight through the nn.Module.
        expected = learner.model(episodes.query_x[task].double())
        torch.testing.assert_close(pre_logits[task], expected, rtol=1e-10, atol=1e-12)
        assert pre_logits[task].requires_grad
    worst = int(query_losses.argmax())
    _, worst_grads = meta_gradients(make_learner(vectorise_tasks=vectorise), episodes.task(worst))
    assert_same_gradients(grads, worst_grads)


# --------------------------------------------------------------------------- ANIL
@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_anil_inner_loop_adapts_only_the_head_on_features_computed_once(monkeypatch, vectorise):
    trajectories, feature_calls = [], []
    original_inner_loop = maml.inner_loop

    def recording_inner_loop(*args, **kwargs):
        trajectories.append(original_inner_loop(*args, **kwargs))
        return trajectories[-1]

    def counting(function):
        def wrapper(*args, **kwargs):
            feature_calls.append(function.__name__)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(maml, "inner_loop", recording_inner_loop)
    monkeypatch.setattr(task_forward, "module_features", counting(task_forward.module_features))
    monkeypatch.setattr(
        task_forward, "conv4_grouped_features", counting(task_forward.conv4_grouped_features)
    )
    learner = make_learner(adapt_parameters="head", inner_steps=4, vectorise_tasks=vectorise)
    body_before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    episodes = make_episodes(num_tasks=2)
    meta_gradients(learner, episodes)
    assert trajectories and all(
        set(params) == {"head.weight", "head.bias"} for t in trajectories for params in t
    )
    assert not trajectories[0][-1]["head.weight"].equal(trajectories[0][0]["head.weight"])
    # Body features: once per task and split (vectorised: once per split), not per step.
    assert len(feature_calls) == (2 if vectorise else 2 * episodes.num_tasks)
    feature_calls.clear()
    predictor = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=5)
    predictor(episodes.query_x[0])
    assert len(feature_calls) == 2
    for name, parameter in learner.model.named_parameters():
        assert torch.equal(parameter, body_before[name])


def test_per_step_batchnorm_parameters_are_not_adapted(monkeypatch):
    trajectories = []
    original_inner_loop = maml.inner_loop

    def recording_inner_loop(*args, **kwargs):
        trajectories.append(original_inner_loop(*args, **kwargs))
        return trajectories[-1]

    monkeypatch.setattr(maml, "inner_loop", recording_inner_loop)
    learner = make_learner(per_step_batchnorm=True, inner_steps=2)
    meta_gradients(learner, make_episodes())
    for trajectory in trajectories:
        for name in learner.batchnorm_names:
            assert all(params[name] is trajectory[0][name] for params in trajectory)
        assert not trajectory[-1]["body.0.0.weight"].equal(trajectory[0]["body.0.0.weight"])


def adam_for(learner: MAMLLearner, meta_lr: float, iteration: int) -> torch.optim.Adam:
    """The optimizer as the train loop builds and schedules it."""
    groups = learner.parameter_groups()
    for group in groups:
        group["lr"] = scheduled_lr(group, meta_lr, iteration)
    return torch.optim.Adam(groups, lr=meta_lr)


def test_s4_frozen_resnet_body_changes_only_head_and_batchnorm():
    torch.manual_seed(0)
    options = Options(adapt_parameters="head", outer_trainable="head_and_batchnorm", inner_lr=0.1)
    learner = MAMLLearner(ResNet18(3), 3, options)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    optimizer = adam_for(learner, 0.01, 0)
    learner.meta_gradients(make_episodes(), TrainProgress(0, 10))
    optimizer.step()
    changed = {n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])}
    batchnorm = set(learner.batchnorm_names)
    assert changed and changed <= batchnorm | {"head.weight", "head.bias"}
    assert {"head.weight", "body.layer4.1.bn2.weight", "body.bn1.bias"} <= changed
    assert learner.model.body.conv1.weight.grad is None  # not even computed


def test_s5_groups_carry_pattern_multipliers_and_body_warmup():
    multipliers = [
        {"pattern": r"^body\.0\.", "multiplier": 0.0},
        {"pattern": r"^body\.3\.0\.", "multiplier": 0.01},
        {"pattern": r"^body\.\d\.1\.", "multiplier": 0.5},
    ]
    learner = make_learner(
        adapt_parameters="head", outer_lr_multipliers=multipliers, body_warmup_iterations=2
    )
    groups = {group["name"]: group for group in learner.parameter_groups()}
    assert set(groups) == {
        "head x1",
        "body x0.01 warmup 2",
        "body_batchnorm x0.5 warmup 2",
        "body x1 warmup 2",
    }
    assert groups["body x0.01 warmup 2"]["parameter_names"] == ["body.3.0.weight", "body.3.0.bias"]
    assert set(groups["body_batchnorm x0.5 warmup 2"]["parameter_names"]) == {
        f"body.{i}.1.{kind}" for i in (1, 2, 3) for kind in ("weight", "bias")
    }
    in_groups = {name for group in groups.values() for name in group["parameter_names"]}
    assert not any(name.startswith("body.0.") for name in in_groups)  # multiplier 0: frozen

    meta_lr = 0.01
    episodes = make_episodes()
    initial = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    optimizer = adam_for(learner, meta_lr, 0)
    for iteration in range(3):
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(group, meta_lr, iteration)
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(episodes, TrainProgress(iteration, 10))
        before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
        optimizer.step()
        changed = {n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])}
        if iteration < 2:  # warmup: only the head moves
            assert changed == {"head.weight", "head.bias"}
            assert all(g["lr"] == 0 for g in optimizer.param_groups if g["warmup_iterations"])
        else:
            assert {"body.3.0.weight", "body.1.1.weight", "body.2.0.weight"} <= changed
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            assert lrs["body x0.01 warmup 2"] == pytest.approx(meta_lr * 0.01)
            assert lrs["body_batchnorm x0.5 warmup 2"] == pytest.approx(meta_lr * 0.5)
    for name, value in initial.items():
        if name.startswith("body.0."):
            assert torch.equal(learner.model.get_parameter(name), value)


def test_scheduled_lr_applies_multiplier_after_warmup():
    group = {"lr_multiplier": 0.2, "warmup_iterations": 10}
    assert scheduled_lr(group, 0.001, 9) == 0.0
    assert scheduled_lr(group, 0.001, 10) == pytest.approx(0.0002)
    assert scheduled_lr({}, 0.001, 0) == pytest.approx(0.001)


# ------------------------------------------------------------------- task dropout (seed's)
@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_task_dropout_masks_fixed_within_a_task_and_different_across_tasks(monkeypatch, vectorise):
    calls = []

    def spying(function, masks_position):
        def wrapper(*args, **kwargs):
            calls.append(args[masks_position] if len(args) > masks_position else None)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(task_forward, "module_features", spying(task_forward.module_features, 3))
    monkeypatch.setattr(
        task_forward, "conv4_grouped_features", spying(task_forward.conv4_grouped_features, 3)
    )
    learner = make_learner(
        inner_steps=2, vectorise_tasks=vectorise, task_dropout_rates=[0.5, 0.5, 0.5, 0.5]
    )
    meta_gradients(learner, make_episodes(num_tasks=2))
    # Per task (loop) or per chunk (vectorised): support at steps 0, 1, then the query pass.
    per_call = [torch.cat([mask.flatten(1) for mask in masks], 1) for masks in calls]
    tasks = (
        [per_call[0:3], per_call[3:6]]
        if not vectorise
        else [
            [call[0] for call in per_call],
            [call[1] for call in per_call],
        ]
    )
    assert len(per_call) == (6 if not vectorise else 3)
    for task_masks in tasks:
        assert all(torch.equal(task_masks[0], masks) for masks in task_masks)
        assert (task_masks[0] == 0).any() and (task_masks[0] > 0).any()
    assert not torch.equal(tasks[0][0], tasks[1][0])
    calls.clear()
    learner.adapt(make_episodes().support_x[0], make_episodes().support_y[0])(
        make_episodes().query_x[0]
    )
    assert calls and all(masks is None for masks in calls)


# -------------------------------------------------------------------------- adapt
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"adapt_parameters": "head"},
        {"inner_lr_mode": "per_parameter"},
        {"per_step_batchnorm": True},
    ],
    ids=["maml", "anil", "meta_sgd", "per_step_batchnorm"],
)
def test_adapt_builds_a_fresh_head_for_another_way_count(options):
    learner = make_learner(n_way=5, **options)
    episodes = make_episodes(n_way=3, k_shot=2, queries=4)
    predictor = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=4)
    logits = predictor(episodes.query_x[0])
    assert logits.shape == (12, 3) and torch.isfinite(logits).all()
    support_logits = predictor(episodes.support_x[0])
    untouched = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=0)
    support_loss = F.cross_entropy(support_logits, episodes.support_y[0])
    assert support_loss < F.cross_entropy(untouched(episodes.support_x[0]), episodes.support_y[0])
    assert learner.model.head.weight.shape == (5, learner.model.head.in_features)


def test_adapt_fits_the_support_set_and_leaves_meta_parameters_alone():
    learner = make_learner(n_way=3, test_inner_steps=5)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    episodes = make_episodes(k_shot=2)
    predictor = learner.adapt(episodes.support_x[0], episodes.support_y[0])
    after_loss = F.cross_entropy(predictor(episodes.support_x[0]), episodes.support_y[0])
    zero_steps = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=0)
    assert after_loss < F.cross_entropy(zero_steps(episodes.support_x[0]), episodes.support_y[0])
    for name, parameter in learner.named_parameters():
        assert torch.equal(parameter, before[name]) and parameter.grad is None


# ------------------------------------------------------------ end to end, tiny
def synthetic_tasks(num_tasks: int, generator: torch.Generator, n_way: int = 3) -> Episodes:
    """Tasks over 12 fixed random binary glyphs; every image is its glyph with 10% of the
    pixels flipped. Classes and their order are drawn per task."""
    glyphs = (torch.rand(12, SIZE, SIZE, generator=torch.Generator().manual_seed(99)) < 0.3).float()

    def draw(classes: torch.Tensor, per_class: int) -> torch.Tensor:
        images = glyphs[classes].repeat_interleave(per_class, dim=0)
        flips = torch.rand(images.shape, generator=generator) < 0.1
        return (images - flips.float()).abs().unsqueeze(1)

    support, query = [], []
    for _ in range(num_tasks):
        classes = torch.randperm(12, generator=generator)[:n_way]
        support.append(draw(classes, 1))
        query.append(draw(classes, 4))
    labels = torch.arange(n_way)
    return Episodes(
        torch.stack(support),
        labels.repeat(num_tasks, 1),
        torch.stack(query),
        labels.repeat_interleave(4).repeat(num_tasks, 1),
    )


def test_a_few_dozen_meta_iterations_reduce_the_query_loss():
    torch.manual_seed(0)
    learner = MAMLLearner(Conv4(3, SIZE, hidden=8), 3, Options(inner_lr=0.4, head_init="zeros"))
    held_out = synthetic_tasks(8, torch.Generator().manual_seed(1))
    optimizer = adam_for(learner, 0.005, 0)
    before = learner.meta_gradients(held_out, TrainProgress(0, 40)).loss
    generator = torch.Generator().manual_seed(2)
    for iteration in range(40):
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(synthetic_tasks(4, generator), TrainProgress(iteration, 40))
        optimizer.step()
    learner.zero_grad(set_to_none=True)
    after = learner.meta_gradients(held_out, TrainProgress(40, 40)).loss
    assert after < 0.6 * before


# ------------------------------------------------------------ build and options
@pytest.mark.filterwarnings("ignore:precision bf16")  # emulated-bf16 CPUs warn
def test_build_from_context_and_bf16_gradients_agree_with_fp32():
    episodes = make_episodes(num_tasks=2)
    grads = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        context = BuildContext(ModelConfig(hidden=8), n_way=3, image_size=SIZE, precision=precision)
        learner = maml.build(Options(inner_lr=0.1), context)
        assert learner.precision == precision
        learner.meta_gradients(episodes, TrainProgress(0, 10))
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()]))
    cosine = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert torch.isfinite(grads[1]).all() and cosine > 0.9  # measured: 0.94


def test_options_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="per_step_batchnorm"):
        Options(adapt_parameters="head", per_step_batchnorm=True)
    with pytest.raises(ValueError):
        Options(outer_lr_multipliers=[{"pattern": "(unclosed", "multiplier": 1.0}])
    with pytest.raises(ValueError):
        Options(task_dropout_rates=[0.1, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="conv4"):
        MAMLLearner(ResNet18(3), 3, Options(task_dropout_rates=[0.1] * 4))


@pytest.mark.parametrize(
    ("params_file", "name"),
    [("params.yaml", "anil_s5"), ("params/paper.yaml", "anil_s5_5w1s")],
)
def test_anil_s5_gives_every_batchnorm_the_batchnorm_multiplier(params_file, name):
    """S5's patterns must catch every BatchNorm of the ResNet18, the shortcut's norm
    (``downsample.1``) included: in trained layers 0.3, never the conv layers' rate."""
    from metalab.algorithms.outer_groups import lr_multiplier
    from metalab.models.factory import build_model
    from metalab.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / params_file)
    experiment = params.experiment(name)
    model = build_model(experiment.model, 5, 28)
    multipliers = experiment.options.outer_lr_multipliers
    norms = [
        f"{module_name}.{kind}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for kind in ("weight", "bias")
    ]
    assert any("downsample.1" in name for name in norms)
    for name in norms:
        frozen = name.startswith(("body.conv1", "body.bn1", "body.layer1", "body.layer2"))
        assert lr_multiplier(name, multipliers) == (0.0 if frozen else 0.3), name
