"""Episode sampling: shapes, labels, class consistency, rotations and determinism."""

import torch

from metalab.data.config import SplitConfig
from metalab.data.episodes import (
    load_episode_set,
    materialize,
    sample_episode_index,
    sample_episodes,
    save_episode_set,
)
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split

DRAWINGS = 20
CHARACTERS = 12
SIZE = 6


def fake_images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (CHARACTERS * DRAWINGS, SIZE, SIZE), generator=generator, dtype=torch.uint8
    )


def all_classes(rotations: int = 1) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(CHARACTERS), torch.arange(rotations))


def test_shapes_and_class_major_labels():
    episodes = sample_episodes(
        fake_images(), all_classes(), DRAWINGS, 5, 2, 3, 4, torch.Generator().manual_seed(0)
    )
    assert episodes.support_x.shape == (4, 10, 1, SIZE, SIZE)
    assert episodes.query_x.shape == (4, 15, 1, SIZE, SIZE)
    assert episodes.support_x.dtype == torch.float32
    assert episodes.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert episodes.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert (episodes.n_way, episodes.k_shot, episodes.num_tasks) == (5, 2, 4)


def test_images_match_their_class_and_drawings_are_distinct():
    images = fake_images()
    index = sample_episode_index(
        all_classes(4), DRAWINGS, 5, 3, 4, 8, torch.Generator().manual_seed(1)
    )
    episodes = materialize(images, index)
    for task in range(8):
        task_classes = torch.stack([index.character[task], index.rotation[task]], 1)
        assert len(set(map(tuple, task_classes.tolist()))) == 5  # five distinct classes
        for way in range(5):
            rows = index.image_index[task, way]
            assert len(set(rows.tolist())) == 7  # support and query drawings all different
            assert set((rows // DRAWINGS).tolist()) == {index.character[task, way].item()}
            turns = index.rotation[task, way].item()
            expected = torch.rot90(images[rows].float() / 255, turns, dims=(-2, -1))
            got = torch.cat(
                [
                    episodes.support_x[task, way * 3 : way * 3 + 3, 0],
                    episodes.query_x[task, way * 4 : way * 4 + 4, 0],
                ]
            )
            assert torch.equal(got, expected)


def test_same_seed_same_episodes_different_seed_different():
    images = fake_images()
    first = sample_episodes(
        images, all_classes(), DRAWINGS, 5, 1, 5, 6, torch.Generator().manual_seed(7)
    )
    second = sample_episodes(
        images, all_classes(), DRAWINGS, 5, 1, 5, 6, torch.Generator().manual_seed(7)
    )
    third = sample_episodes(
        images, all_classes(), DRAWINGS, 5, 1, 5, 6, torch.Generator().manual_seed(8)
    )
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), second.tensors(), strict=True))
    assert not torch.equal(first.support_x, third.support_x)


def test_too_many_ways_or_shots_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="need 20 classes"):
        sample_episode_index(all_classes(), DRAWINGS, 20, 1, 1, 1, torch.Generator())
    with pytest.raises(ValueError, match="need 21 drawings"):
        sample_episode_index(all_classes(), DRAWINGS, 5, 6, 15, 1, torch.Generator())


def test_episode_set_round_trip(tmp_path):
    index = sample_episode_index(
        all_classes(4), DRAWINGS, 5, 1, 2, 3, torch.Generator().manual_seed(0)
    )
    save_episode_set(tmp_path / "5w1s.npz", index, setting="5w1s", protocol="vinyals")
    loaded, metadata = load_episode_set(tmp_path / "5w1s.npz")
    assert metadata == {"setting": "5w1s", "protocol": "vinyals"}
    assert torch.equal(loaded.image_index, index.image_index) and torch.equal(
        loaded.rotation, index.rotation
    )
    assert loaded.k_shot == 1 and loaded.query_per_class == 2
    assert not list(tmp_path.glob("*.tmp"))


def assert_classes_are_turned_drawings(
    stored: torch.Tensor, drawings: int, index, episodes
) -> set[int]:
    """Every image of class (c, r) in `episodes` is one of character c's stored drawings
    (``stored`` uint8 [N, S, S], rows c*D .. c*D+D-1) turned r quarter turns by
    `torch.rot90`, each drawing at most once per class; found by matching pixels, not by
    trusting ``index.image_index``. Returns the quarter turns seen."""
    num_tasks, n_way, _ = index.image_index.shape
    size = stored.shape[-1]
    k = index.k_shot
    support = episodes.support_x.view(num_tasks, n_way, k, size, size)
    query = episodes.query_x.view(num_tasks, n_way, -1, size, size)
    turns_seen = set()
    for task in range(num_tasks):
        for way in range(n_way):
            character = int(index.character[task, way])
            turns = int(index.rotation[task, way])
            turns_seen.add(turns)
            own = stored[character * drawings : (character + 1) * drawings].float() / 255
            candidates = torch.rot90(own, turns, dims=(-2, -1))  # [D, S, S]
            got = torch.cat([support[task, way], query[task, way]])  # [K+Q, S, S]
            matches = (got.unsqueeze(1) == candidates.unsqueeze(0)).flatten(2).all(2)
            assert (matches.sum(1) == 1).all(), (task, way, character, turns)
            assert matches.any(0).sum() == got.shape[0]  # distinct drawings
    return turns_seen


def test_rotated_meta_train_classes_are_turned_drawings_of_their_character(
    tiny_prefetched_28,
):
    """On the stored (prefetched) arrays, under rotations=meta_train: a sampled class
    (c, r) shows character c's drawings turned r quarter turns, for every r."""
    arrays = load_prefetched(tiny_prefetched_28)
    drawings = arrays.drawings_per_character
    config = SplitConfig(protocol="lake", validation_characters=5, rotations="meta_train")
    split = make_split(arrays.character_origin, config)
    index = sample_episode_index(
        split.meta_train, drawings, 5, 2, 3, 12, torch.Generator().manual_seed(3)
    )
    episodes = materialize(arrays.images, index)
    turns = assert_classes_are_turned_drawings(arrays.images, drawings, index, episodes)
    assert turns == {0, 1, 2, 3}
    # The premise: the fixture's drawings are not symmetric under a turn, so a class shown
    # unrotated (or turned the wrong way) could not pass the pixel match above.
    images = arrays.images[: 20 * drawings].float()
    for quarter in (1, 2, 3):
        turned = torch.rot90(images, quarter, dims=(-2, -1))
        assert (turned != images).flatten(1).any(1).all()
