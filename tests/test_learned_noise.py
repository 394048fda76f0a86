"""Meta Dropout as Lee et al. (ICLR 2020) define it (``learned_noise`` of the MAML core):
the noisy forward against a per-task reference, noise on support passes only, phi's
second-order meta-gradient against finite differences, first-order behaviour, test-time
Monte Carlo averaging, determinism, and the option off leaving everything as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalab import evaluation
from metalab.algorithms import anil_task_encoder, learned_noise, maml_adaptation
from metalab.algorithms.base import TrainProgress
from metalab.algorithms.functional import adaptation_lr, adaptation_start, per_task_cross_entropy
from metalab.algorithms.learned_noise import NoiseGenerator, SupportNoise, task_seeds
from metalab.algorithms.maml import MAMLLearner, Options
from metalab.data.episodes import EpisodeIndex, Episodes
from metalab.learner_api import Learner
from metalab.models import Conv4, ResNet18

SIZE = 16  # 16 -> 8 -> 4 -> 2 -> 1 through the four max-pooling blocks
N_WAY = 3


def make_episodes(num_tasks: int = 2, k_shot: int = 1, queries: int = 2) -> Episodes:
    generator = torch.Generator().manual_seed(0)

    def images(count: int) -> torch.Tensor:
        return torch.rand(num_tasks, count, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(num_tasks, 1)

    return Episodes(
        images(N_WAY * k_shot), labels(k_shot), images(N_WAY * queries), labels(queries)
    )


def make_learner(downsample: str = "maxpool", **options) -> MAMLLearner:
    torch.manual_seed(0)
    options.setdefault("inner_lr", 0.3)
    options.setdefault("learned_noise", True)
    model = Conv4(N_WAY, SIZE, hidden=4, downsample=downsample)
    return MAMLLearner(model, N_WAY, Options(**options)).double()


def meta_gradients(learner: MAMLLearner, episodes: Episodes, seed: int = 7) -> dict:
    """Meta-gradients with the tasks' noise seeds drawn after ``torch.manual_seed(seed)``
    (the same seed: the same noise eps)."""
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    learner.meta_gradients(episodes, TrainProgress(0, 100))
    return {n: p.grad.clone() for n, p in learner.named_meta_parameters() if p.grad is not None}


def meta_loss(learner: MAMLLearner, episodes: Episodes, seed: int = 7) -> float:
    torch.manual_seed(seed)
    return learner.meta_gradients(episodes, TrainProgress(0, 100)).extra["meta_loss"]


# --------------------------------------------------------------- the noisy forward
@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
def test_noisy_logits_match_a_per_task_reference(downsample: str):
    """Three tasks with their own weights at once equal each task run through the Conv4
    modules with z = softplus(conv_phi(h) + eps) multiplying the pre-BatchNorm output and
    softplus(w_phi . f + b_phi) * eps' added to the logits."""
    learner = make_learner(downsample)
    model, generator = learner.model, learner.noise_generator
    num_tasks, batch = 3, 4
    x = torch.rand(num_tasks, batch, 1, SIZE, SIZE, dtype=torch.float64)
    # Per-task weights: the model's plus a different perturbation per task.
    params = {
        n: p.detach() + 0.1 * torch.randn(num_tasks, *p.shape, dtype=p.dtype)
        for n, p in model.named_parameters()
    }
    recorded: list[torch.Tensor] = []

    def normal(shape, like):
        eps = torch.randn(shape[0], num_tasks, *shape[1:], dtype=like.dtype)
        recorded.append(eps)
        return eps

    logits = learned_noise.noisy_logits(model, generator, params, x, normal)
    for t in range(num_tasks):
        weights = {n: p[t] for n, p in params.items()}
        h = x[t]
        for index, block in enumerate(model.body):
            conv = {kind: weights[f"body.{index}.0.{kind}"] for kind in ("weight", "bias")}
            mu = functional_call(block[0], conv, (h,))
            z = F.softplus(generator.convs[index](h) + recorded[index][:, t])
            norm_weights = {kind: weights[f"body.{index}.1.{kind}"] for kind in ("weight", "bias")}
            h = F.batch_norm(mu * z, None, None, training=True, eps=1e-5, **norm_weights)
            h = F.relu(h)
            if isinstance(block[-1], torch.nn.MaxPool2d):
                h = F.max_pool2d(h, 2)
        features = h.flatten(1)
        expected = F.linear(features, weights["head.weight"], weights["head.bias"])
        expected = expected + F.softplus(generator.head(features)) * recorded[-1][:, t]
        torch.testing.assert_close(logits[t], expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------- where the noise acts
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("vectorise", [False, True], ids=["loop", "vectorised"])
def test_query_logits_are_the_noise_free_network_at_the_adapted_weights(adapt, vectorise):
    num_tasks = 2 if vectorise else 1
    learner = make_learner(adapt_parameters=adapt, vectorise_tasks=vectorise, inner_steps=2)
    episodes = make_episodes(num_tasks)
    sx, sy, qx, qy = episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y
    seeds = [11, 12][:num_tasks]
    weights = learner.step_loss_weights(0)
    outcome = learner.run_tasks(sx, sy, qx, qy, None, True, weights, seeds)

    forward = learner._task_forward(sx, qx, None, True)
    start = learner._initial_params(num_tasks if forward.stacked else None)
    noise = learned_noise.support_noise(learner.noise_generator, seeds, 1)
    trajectory = learner._adapt_on_support(forward, start, sy, learner._inner_lr, 2, True, noise)
    phi = {n: p.detach().clone() for n, p in learner.noise_generator.named_parameters()}
    for t in range(num_tasks):
        adapted = {n: p[t] if forward.stacked else p for n, p in trajectory[-1].items()}
        # The plain nn.Module: no noise generator anywhere in the query pass.
        expected = functional_call(learner.model, adapted, (qx[t],))
        torch.testing.assert_close(outcome.final_query_logits[t], expected)
    # phi is never adapted: not in the trajectory, unchanged.
    assert not any("learned_noise" in n or "convs." in n for n in trajectory[-1])
    for n, p in learner.noise_generator.named_parameters():
        assert torch.equal(p, phi[n])

    # The support passes are noisy: the inner loop's loss is not the clean one, and a
    # clean inner loop ends elsewhere.
    with torch.no_grad():
        clean = per_task_cross_entropy(forward.logits(start, "support", 0), sy).sum()
        noisy = SupportNoise(learner.noise_generator, seeds, 1).support_loss(forward, start, 0, sy)
    assert abs(noisy.item() - clean.item()) > 1e-3
    clean_trajectory = learner._adapt_on_support(forward, start, sy, learner._inner_lr, 2, True)
    name = "head.weight"
    assert not torch.allclose(clean_trajectory[-1][name], trajectory[-1][name])


def test_loop_and_vectorised_paths_draw_the_same_noise():
    episodes = make_episodes(num_tasks=3)
    loop = meta_gradients(make_learner(vectorise_tasks=False, inner_steps=2), episodes)
    vectorised = meta_gradients(make_learner(task_chunk_size=2, inner_steps=2), episodes)
    assert loop.keys() == vectorised.keys()
    for name in loop:
        torch.testing.assert_close(loop[name], vectorised[name], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------- meta-gradients
@pytest.mark.parametrize(
    "options",
    [{"vectorise_tasks": False}, {}, {"adapt_parameters": "head"}],
    ids=["maml-loop", "maml-vectorised", "anil"],
)
def test_phi_meta_gradient_matches_finite_differences(options):
    """Second order, float64, the noise eps fixed (same seeds for every evaluation)."""
    learner = make_learner(inner_steps=2, **options)
    episodes = make_episodes()
    grads = meta_gradients(learner, episodes)
    phi = [n for n, _ in learner.named_meta_parameters() if n.startswith("learned_noise.")]
    assert phi and all(grads[n].abs().sum() > 0 for n in phi), "phi without meta-gradient"
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for name, parameter in learner.named_meta_parameters():
        if not name.startswith(
            ("learned_noise.convs.0", "learned_noise.convs.2", "learned_noise.head", "body.1.0")
        ):
            continue
        index = int(torch.randint(parameter.numel(), (1,), generator=generator))
        flat = parameter.data.view(-1)
        original = flat[index].item()
        values = []
        for shift in (1e-6, -1e-6):
            flat[index] = original + shift
            values.append(meta_loss(learner, episodes))
        flat[index] = original
        numeric = (values[0] - values[1]) / 2e-6
        analytic = grads[name].view(-1)[index].item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, index)
        checked += 1
    assert checked >= 7


def test_first_order_is_rejected_and_annealed_first_order_steps_leave_phi_without_gradient():
    with pytest.raises(ValueError, match="learned_noise needs first_order: false"):
        Options(learned_noise=True, first_order=True)
    # MAML++ derivative-order annealing: first-order iterations treat the inner gradients
    # as constants, the only path from phi to the meta-loss, so phi gets no gradient then.
    learner = make_learner(first_order_until_iteration=5)
    episodes = make_episodes()
    for iteration, expect_gradient in ((0, False), (5, True)):
        learner.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        learner.meta_gradients(episodes, TrainProgress(iteration, 100))
        phi = learner.noise_generator.convs[1].weight
        assert (phi.grad is not None and bool(phi.grad.abs().sum() > 0)) == expect_gradient


# ------------------------------------------------------------------- test time
def test_test_time_average_equals_the_mean_of_single_sample_runs():
    """With S samples one inner step descends the mean of the S samples' support losses,
    so the adapted weights are the mean of S one-sample adaptations with the same noise;
    the query prediction is the noise-free network at those weights."""
    samples = 3
    learner = make_learner(learned_noise_test_samples=samples, task_chunk_size=4)
    episodes = make_episodes(num_tasks=2)
    sx, sy = episodes.support_x, episodes.support_y
    torch.manual_seed(3)
    _, ends = maml_adaptation.adapt_chunks(learner, sx, sy, 1)
    averaged = ends[0][1]

    torch.manual_seed(3)
    seeds = task_seeds(learner.noise_generator, 2)  # what adapt_chunks drew
    forward = maml_adaptation.test_time_forward(learner, sx, None)
    start = adaptation_start(learner._initial_params(None), learner.adapted_names, N_WAY, N_WAY)
    start = {n: p.unsqueeze(0).expand(2, *p.shape) for n, p in start.items()}
    lr = adaptation_lr(learner._inner_lr, N_WAY, N_WAY)
    # One sample at a time from the same per-task streams: sample s's noise is the s-th draw.
    single = SupportNoise(learner.noise_generator, seeds, 1)
    runs = [
        learner._adapt_on_support(forward, start, sy, lr, 1, False, single)[-1]
        for _ in range(samples)
    ]
    for name, value in averaged.items():
        mean = torch.stack([run[name].detach() for run in runs]).mean(0)
        torch.testing.assert_close(value, mean, rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.allclose(runs[0]["head.weight"], runs[1]["head.weight"])

    torch.manual_seed(3)
    logits = learner.adapt_many(sx, sy, 1)(episodes.query_x)
    for t in range(2):
        adapted = {n: p[t] for n, p in averaged.items()}
        expected = functional_call(learner.model, adapted, (episodes.query_x[t],))
        torch.testing.assert_close(logits[t], expected)


def test_test_time_adaptation_is_deterministic_and_batching_independent():
    learner = make_learner(learned_noise_test_samples=2, task_chunk_size=2)
    episodes = make_episodes(num_tasks=3)
    sx, sy, qx = episodes.support_x, episodes.support_y, episodes.query_x

    def batched(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        return learner.adapt_before_after(sx, sy, 2)(qx)

    before, after = batched(3)
    again_before, again_after = batched(3)
    assert torch.equal(after, again_after) and torch.equal(before, again_before)
    assert not torch.allclose(after, batched(4)[1])  # the noise matters
    # One task at a time, as the per-episode evaluation loop calls it (after, then 0 steps
    # which draw nothing): the same seeds in task order, the same logits.
    torch.manual_seed(3)
    one_by_one = []
    for t in range(3):
        one_by_one.append(learner.adapt(sx[t], sy[t], 2)(qx[t]))
        learner.adapt(sx[t], sy[t], 0)
    torch.testing.assert_close(torch.stack(one_by_one), after, rtol=1e-9, atol=1e-12)
    # Zero steps: the un-adapted network, no noise drawn.
    state = torch.get_rng_state()
    learner.adapt_many(sx, sy, 0)
    assert torch.equal(state, torch.get_rng_state())


def test_other_way_count_at_test_time():
    learner = make_learner(learned_noise_test_samples=2)
    episodes = make_episodes()
    support_y = episodes.support_y.clamp(max=1)  # a 2-way task (labels 0, 1, 1)
    logits = learner.adapt_many(episodes.support_x, support_y, 2)(episodes.query_x)
    assert logits.shape == (2, 6, 2) and torch.isfinite(logits).all()


# --------------------------------------------------------- options and parameters
def test_phi_is_an_outer_only_meta_parameter():
    learner = make_learner(outer_trainable="head")
    names = [n for n, _ in learner.named_meta_parameters() if n.startswith("learned_noise.")]
    assert len(names) == 10  # four convolutions and the logit-scale map, weight and bias each
    assert not set(learner.adapted_names) & set(names)
    grouped = [n for g in learner.parameter_groups() for n in g["parameter_names"]]
    assert set(names) <= set(grouped)  # trained whatever outer_trainable says
    assert any(g["name"].startswith("learned_noise") for g in learner.parameter_groups())
    assert all(
        f"noise_generator.{n.removeprefix('learned_noise.')}" in learner.state_dict() for n in names
    )


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="task_dropout_rates"):
        Options(learned_noise=True, task_dropout_rates=[0.1] * 4)
    with pytest.raises(ValueError, match="conv4"):
        MAMLLearner(ResNet18(N_WAY), N_WAY, Options(learned_noise=True))
    with pytest.raises(ValueError, match="not for anil_task_encoder"):
        anil_task_encoder.Options(learned_noise=True)
    with pytest.raises(ValueError, match="learned_noise_test_samples"):
        Options(learned_noise=True, learned_noise_test_samples=0)


def test_off_draws_no_noise_and_adds_no_parameter(monkeypatch: pytest.MonkeyPatch):
    """Default options: no generator, no extra random numbers, no noise hook reached; the
    same numbers as a learner built with ``learned_noise: false`` spelled out."""

    def unreachable(*args, **kwargs):
        raise AssertionError("learned-noise code reached with the option off")

    torch.manual_seed(0)
    Conv4(N_WAY, SIZE, hidden=4)
    rng_after_model = torch.get_rng_state()
    torch.manual_seed(0)
    MAMLLearner(Conv4(N_WAY, SIZE, hidden=4), N_WAY, Options())
    assert torch.equal(torch.get_rng_state(), rng_after_model)

    monkeypatch.setattr(learned_noise.SupportNoise, "support_loss", unreachable)
    monkeypatch.setattr(learned_noise.SupportNoise, "__init__", unreachable)
    monkeypatch.setattr(learned_noise.NoiseGenerator, "__init__", unreachable)
    episodes = make_episodes()
    results = []
    for options in ({}, {"learned_noise": False}):
        learner = make_learner(**{"learned_noise": False, **options})
        assert learner.noise_generator is None
        assert not any("noise" in n for n in learner.state_dict())
        grads = meta_gradients(learner, episodes)
        torch.manual_seed(1)
        predictor = learner.adapt_before_after(episodes.support_x, episodes.support_y, 2)
        before, after = predictor(episodes.query_x)
        results.append((grads, before, after, torch.get_rng_state()))
    (grads, before, after, rng), (grads2, before2, after2, rng2) = results
    assert grads.keys() == grads2.keys()
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert torch.equal(before, before2) and torch.equal(after, after2) and torch.equal(rng, rng2)


def test_noise_generator_mirrors_the_block_convolutions():
    model = Conv4(N_WAY, SIZE, hidden=4, downsample="stride")
    generator = NoiseGenerator(model)
    for block, conv in zip(model.body, generator.convs, strict=True):
        assert conv.weight.shape == block[0].weight.shape
        assert conv.stride == block[0].stride and conv.padding == block[0].padding
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert generator.head.weight.shape == (1, model.feature_dim)


def test_cpu_run_creates_no_tensor_on_the_default_device():
    """Noise seeds and eps are drawn on the CPU explicitly: with ``meta`` as torch's default
    device a factory call without ``device=`` would make a meta tensor and fail here."""
    learner = make_learner(inner_steps=2)
    episodes = make_episodes()
    with torch.device("meta"):
        grads = meta_gradients(learner, episodes)
        logits = learner.adapt_many(episodes.support_x, episodes.support_y, 2)(episodes.query_x)
    assert all(g.device.type == "cpu" for g in grads.values())
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()


def test_evaluation_reruns_and_per_episode_loop_give_the_same_accuracies(monkeypatch):
    """`evaluate_episode_set` seeds the global RNG per setting: a rerun draws the same
    noise; the per-episode loop (after, then 0 steps) draws the batched call's seeds in
    task order, so it scores every episode alike; chunks of uneven size change nothing."""
    characters, drawings, size, episodes, n_way, k_shot, queries = 8, 6, SIZE, 5, 3, 1, 2
    generator = torch.Generator().manual_seed(0)
    patterns = torch.rand(characters, 1, size, size, generator=generator) < 0.3
    flips = torch.rand(characters, drawings, size, size, generator=generator) < 0.05
    images = ((patterns ^ flips).to(torch.uint8) * 255).reshape(-1, size, size)
    chosen = torch.stack([torch.randperm(characters, generator=generator)[:n_way]] * episodes)
    image_index = chosen.unsqueeze(-1) * drawings + torch.arange(k_shot + queries)
    rotation = torch.zeros(episodes, n_way, dtype=torch.int64)
    index = EpisodeIndex(image_index, rotation, chosen, k_shot)
    options = Options(learned_noise=True, learned_noise_test_samples=2, test_inner_steps=2)
    torch.manual_seed(0)
    meta_learner = MAMLLearner(Conv4(n_way, size, hidden=4), n_way, options)
    learner = Learner(meta_learner, options, n_way, size)
    monkeypatch.setattr(evaluation, "CHUNK_IMAGES", 2 * n_way * (k_shot + queries))  # 2 + 2 + 1

    def run(batch_tasks: bool):
        result = evaluation.evaluate_episode_set(
            learner, images, index, "3w1s", seed=5, progress=False, batch_tasks=batch_tasks
        )
        return result.accuracy_before, result.accuracy_after

    before, after = run(True)
    again_before, again_after = run(True)
    loop_before, loop_after = run(False)
    assert np.array_equal(after, again_after) and np.array_equal(before, again_before)
    assert np.array_equal(after, loop_after) and np.array_equal(before, loop_before)
