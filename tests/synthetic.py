"""Synthetic few-shot tasks, and the helpers the algorithm tests share around them.

Every class is a fixed random binary pattern and every image of it is that pattern plus
Gaussian noise, so a few meta-training steps of a tiny network make measurable progress.
Two families, kept apart because the tests pin the exact data each one draws:

- seeded tasks (``class_patterns``, ``sample_episodes``): 30% ink, noise 0.4, each batch of
  tasks drawn from its own seed;
- streamed tasks (``half_ink_patterns``, ``stream_episodes``): 50% ink, noise 0.3, drawn
  one task after another from the caller's generator, so consecutive batches differ.

Everything here is deterministic given its seed or generator (and torch's seed, for the
learners' own randomness).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from metalab.algorithms.base import BuildContext, MetaLearner, TrainProgress
from metalab.data.episodes import Episodes
from metalab.models import ModelConfig

IMAGE_SIZE = 16  # side of the seeded tasks' images and of ``build_context``'s learners


def build_context(
    n_way: int = 5, precision: str = "fp32", image_size: int = IMAGE_SIZE
) -> BuildContext:
    """A build context for a small Conv4 (8 channels) on ``image_size`` square images."""
    return BuildContext(
        model=ModelConfig(hidden=8), n_way=n_way, image_size=image_size, precision=precision
    )


def class_patterns(num_classes: int, seed: int, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Fixed random binary images float32 [C, 1, S, S], 30% ink, one per synthetic class."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(num_classes, 1, image_size, image_size, generator=generator)
    return (uniform < 0.3).float()


def sample_episodes(
    patterns: torch.Tensor,
    num_tasks: int,
    n_way: int,
    k_shot: int,
    q_query: int,
    seed: int,
    noise: float = 0.4,
) -> Episodes:
    """Tasks of n_way random classes of ``patterns`` [C, 1, H, W]; label i is the i-th class
    drawn. All tasks' classes are drawn first, then the support and then the query images.

    Returns Episodes: support_x [T, N*K, 1, H, W], support_y [T, N*K],
    query_x [T, N*Q, 1, H, W], query_y [T, N*Q]."""
    generator = torch.Generator().manual_seed(seed)

    def images(classes: torch.Tensor, per_class: int) -> torch.Tensor:
        clean = patterns[classes].repeat_interleave(per_class, dim=0)
        return clean + noise * torch.randn(clean.shape, generator=generator)

    tasks = [torch.randperm(len(patterns), generator=generator)[:n_way] for _ in range(num_tasks)]
    return Episodes(
        support_x=torch.stack([images(classes, k_shot) for classes in tasks]),
        support_y=torch.arange(n_way).repeat_interleave(k_shot).repeat(num_tasks, 1),
        query_x=torch.stack([images(classes, q_query) for classes in tasks]),
        query_y=torch.arange(n_way).repeat_interleave(q_query).repeat(num_tasks, 1),
    )


def half_ink_patterns(num_classes: int, seed: int, image_size: int) -> torch.Tensor:
    """Fixed random binary images float32 [C, 1, S, S], 50% ink, one per synthetic class."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(num_classes, 1, image_size, image_size, generator=generator)
    return (uniform > 0.5).float()


def stream_episodes(
    patterns: torch.Tensor,
    num_tasks: int,
    n_way: int,
    k_shot: int,
    q_query: int,
    generator: torch.Generator,
    noise: float = 0.3,
) -> Episodes:
    """Tasks over a pool of class patterns [C, 1, H, W], drawn task by task from
    ``generator`` (its state advances): each task picks n_way classes in random label order,
    then its support and its query images.

    Returns Episodes: support_x [T, N*K, 1, H, W], support_y [T, N*K],
    query_x [T, N*Q, 1, H, W], query_y [T, N*Q]."""
    support_x, support_y, query_x, query_y = [], [], [], []
    for _ in range(num_tasks):
        classes = torch.randperm(patterns.shape[0], generator=generator)[:n_way]

        def draw(per_class: int, classes: torch.Tensor = classes) -> torch.Tensor:
            images = patterns[classes].repeat_interleave(per_class, dim=0)
            return images + noise * torch.randn(images.shape, generator=generator)

        support_x.append(draw(k_shot))
        query_x.append(draw(q_query))
        support_y.append(torch.arange(n_way).repeat_interleave(k_shot))
        query_y.append(torch.arange(n_way).repeat_interleave(q_query))
    return Episodes(
        torch.stack(support_x), torch.stack(support_y), torch.stack(query_x), torch.stack(query_y)
    )


def as_float64(episodes: Episodes) -> Episodes:
    """The same episodes with float64 images (for checks against finite differences)."""
    return Episodes(
        episodes.support_x.double(), episodes.support_y, episodes.query_x.double(), episodes.query_y
    )


def adapted_query_loss(
    learner: MetaLearner, episodes: Episodes, mean_in_float64: bool = False
) -> float:
    """Mean query cross-entropy of ``learner.adapt`` predictions over the tasks of
    ``episodes``: the per-task losses averaged as a float32 tensor, or with
    ``mean_in_float64`` as Python floats (the two differ in the last bits)."""
    losses = []
    for task in range(episodes.num_tasks):
        predict = learner.adapt(episodes.support_x[task], episodes.support_y[task])
        losses.append(F.cross_entropy(predict(episodes.query_x[task]), episodes.query_y[task]))
    if mean_in_float64:
        return sum(loss.item() for loss in losses) / len(losses)
    return torch.stack(losses).mean().item()


def meta_train(learner: MetaLearner, patterns: torch.Tensor, steps: int, seed: int) -> list[float]:
    """``steps`` Adam steps (lr 0.01) on all of ``learner``'s parameters, each on 4 seeded
    5-way 1-shot 3-query tasks of ``patterns`` [C, 1, H, W] (seed ``seed + step``).

    Returns the meta-loss of every step."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        episodes = sample_episodes(patterns, 4, 5, 1, 3, seed=seed + step)
        optimizer.zero_grad()
        stats = learner.meta_gradients(episodes, TrainProgress(step, steps))
        optimizer.step()
        losses.append(stats.loss)
    return losses


def held_out_losses_around_training(
    learner: MetaLearner, steps: int
) -> tuple[float, float, list[float]]:
    """``meta_train`` for ``steps`` on ``class_patterns(12, seed=3)`` (training seed 0).

    Returns the adapted query loss on 6 held-out tasks (seed 1000) before and after, and
    the meta-loss of every step."""
    patterns = class_patterns(12, seed=3)
    held_out = sample_episodes(patterns, 6, 5, 1, 3, seed=1000)
    before = adapted_query_loss(learner, held_out)
    losses = meta_train(learner, patterns, steps=steps, seed=0)
    return before, adapted_query_loss(learner, held_out), losses


def meta_train_from_torch_seed(
    build_learner: Callable[[], MetaLearner], torch_seed: int, steps: int
) -> list[float]:
    """Seed torch, build a learner and ``meta_train`` it for ``steps`` on
    ``class_patterns(12, seed=3)`` (training seed 0). Returns the meta-loss of every step."""
    patterns = class_patterns(12, seed=3)
    torch.manual_seed(torch_seed)
    return meta_train(build_learner(), patterns, steps=steps, seed=0)


def held_out_losses_around_streamed_training(
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer,
    patterns: torch.Tensor,
    n_way: int,
    iterations: int,
) -> tuple[float, float]:
    """``iterations`` outer steps of ``optimizer``, each on 4 streamed n_way 1-shot 4-query
    tasks of ``patterns`` [C, 1, H, W] (generator seed 1).

    Returns the adapted query loss (``mean_in_float64``) on 6 held-out tasks of the same
    shape (generator seed 99) before and after."""
    held_out = stream_episodes(patterns, 6, n_way, 1, 4, torch.Generator().manual_seed(99))
    before = adapted_query_loss(learner, held_out, mean_in_float64=True)
    generator = torch.Generator().manual_seed(1)
    for iteration in range(iterations):
        episodes = stream_episodes(patterns, 4, n_way, 1, 4, generator)
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradients(episodes, TrainProgress(iteration, iterations))
        optimizer.step()
    return before, adapted_query_loss(learner, held_out, mean_in_float64=True)


def central_differences(
    loss: Callable[[], torch.Tensor],
    parameter: torch.Tensor,
    indices: torch.Tensor,
    step: float = 1e-6,
) -> torch.Tensor:
    """Central finite differences of the scalar ``loss()`` in the entries ``indices``
    (int64 [M], into the flattened ``parameter``), each entry restored afterwards.

    Returns float64 [M]: (loss(p + step) - loss(p - step)) / (2 step) per entry."""
    flat = parameter.data.view(-1)
    numeric = []
    for index in indices.tolist():
        original = flat[index].item()
        flat[index] = original + step
        plus = loss().item()
        flat[index] = original - step
        minus = loss().item()
        flat[index] = original
        numeric.append((plus - minus) / (2 * step))
    return torch.tensor(numeric, dtype=torch.float64)


def record_dropout_masks(learner: MetaLearner) -> list:
    """Wrap ``learner.embedding.network.features`` so that every call appends its
    ``dropout_masks`` argument (None, or one mask per block) to the returned list."""
    network = learner.embedding.network
    original = network.features
    calls = []

    def features(x: torch.Tensor, dropout_masks: list | None = None) -> torch.Tensor:
        calls.append(dropout_masks)
        return original(x, dropout_masks)

    network.features = features
    return calls
