"""Every stage draws only from its own part of the class split.

Meta-training tasks come from ``split.meta_train``, validation tasks from
``split.validation``, the stored evaluation episodes from ``split.meta_test`` and
supervised pretraining sees only meta-train characters. Each test records which class rows
(character, rotation) or image rows a stage actually used, on the tiny synthetic Omniglot
fixture, under both split protocols (lake: characters; vinyals: pooled characters with
rotations as classes) and Lake with rotated meta-train classes only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from metalab import training
from metalab.algorithms import pretrain
from metalab.algorithms.pretrain import PretrainParams, meta_train_drawings
from metalab.data.config import DataParams, EpisodesConfig, SplitConfig
from metalab.data.episodes import EpisodeIndex, load_episode_set, write_evaluation_episodes
from metalab.data.prefetch import OmniglotArrays, load_prefetched
from metalab.data.splits import Split, make_split
from metalab.layout import PREFETCHED_FILE
from metalab.params import Params, validate_params

ROOT = Path(__file__).resolve().parents[1]

# The fixture has 20 background and 12 evaluation characters, 20 drawings each.
SPLITS = {
    "lake": {"protocol": "lake", "validation_characters": 5},
    "vinyals": {
        "protocol": "vinyals",
        "vinyals_train_characters": 16,
        "vinyals_validation_characters": 6,
    },
    # Lake with each meta-train character in four quarter turns, the other parts unrotated.
    "lake_rotated": {"protocol": "lake", "validation_characters": 5, "rotations": "meta_train"},
}
PARTS = ("meta_train", "validation", "meta_test")


@pytest.fixture(scope="module")
def arrays(tiny_prefetched_28) -> OmniglotArrays:
    return load_prefetched(tiny_prefetched_28)


def class_set(classes: torch.Tensor) -> set[tuple[int, int]]:
    """{(character, rotation)} of a split part (int64 [C, 2])."""
    return {(int(c), int(r)) for c, r in classes.tolist()}


def drawn_classes(index: EpisodeIndex, drawings: int) -> set[tuple[int, int]]:
    """The (character, rotation) classes an episode index uses, checking first that every
    image row really is a drawing of the character it claims (rows c*D .. c*D+D-1)."""
    row_character = index.image_index // drawings
    assert torch.equal(row_character, index.character.unsqueeze(-1).expand_as(row_character))
    pairs = zip(index.character.flatten().tolist(), index.rotation.flatten().tolist(), strict=True)
    return set(pairs)


def assert_only_from(drawn: set[tuple[int, int]], split: Split, part: str) -> None:
    """``drawn`` is a non-empty subset of ``part`` and shares no character with the others."""
    assert drawn, "nothing was drawn"
    allowed = class_set(getattr(split, part))
    assert drawn <= allowed, f"classes outside {part}: {sorted(drawn - allowed)}"
    characters = {character for character, _ in drawn}
    for other in PARTS:
        if other != part:
            leaked = characters & {c for c, _ in class_set(getattr(split, other))}
            assert not leaked, f"{part} draws {other} characters {sorted(leaked)}"


def test_the_fixture_split_parts_are_disjoint_and_non_empty(arrays):
    """The premise of every test below: on the fixture, both protocols give three
    non-empty parts without a shared character (else 'subset of its part' proves nothing)."""
    for config in SPLITS.values():
        split = make_split(arrays.character_origin, SplitConfig(**config))
        characters = [{c for c, _ in class_set(getattr(split, part))} for part in PARTS]
        assert all(characters)
        assert not (characters[0] & characters[1] or characters[0] & characters[2])
        assert not characters[1] & characters[2]


# ----------------------------------------------------------------------- meta-training
def train_params(split_config: dict) -> Params:
    return validate_params(
        {
            "data": {"split": split_config},
            "train": {
                "n_way": 3,
                "k_shot": 1,
                "query_per_class": 2,
                "meta_batch_size": 4,
                "iterations": 8,
                "threads": 1,
                "validate_every": 4,
                "validation_episodes": 6,
                "checkpoint_every": 8,
                "log_every": 4,
            },
            "experiments": {"proto": {"algorithm": "protonets", "model": {"hidden": 8}}},
        }
    )


class MaterializeRecorder:
    """Stands in for `metalab.training.materialize`: keeps every index it is given."""

    def __init__(self) -> None:
        self.indices: list[EpisodeIndex] = []
        self.outputs: list = []  # the Episodes returned for each index, in order
        self.real = training.materialize

    def __call__(self, images: torch.Tensor, index: EpisodeIndex):
        self.indices.append(index)
        self.outputs.append(self.real(images, index))
        return self.outputs[-1]

    def take(self) -> list[EpisodeIndex]:
        taken, self.indices = self.indices, []
        return taken


@pytest.mark.parametrize("protocol", SPLITS)
def test_trainer_trains_on_meta_train_and_validates_on_validation_classes(
    protocol, arrays, tmp_path, monkeypatch
):
    params = train_params(SPLITS[protocol])
    split = make_split(arrays.character_origin, params.data.split)
    drawings = arrays.drawings_per_character
    trainer = training.Trainer("proto", params, arrays, split, tmp_path, progress=False)
    recorder = MaterializeRecorder()
    monkeypatch.setattr(training, "materialize", recorder)

    # (a) training tasks: what `step` samples and materialises for the learner.
    sampled: list[EpisodeIndex] = []
    real_sample = training.sample_episode_index

    def recording_sample(*args, **kwargs) -> EpisodeIndex:
        index = real_sample(*args, **kwargs)
        sampled.append(index)
        return index

    monkeypatch.setattr(training, "sample_episode_index", recording_sample)
    for _ in range(6):
        trainer.step()
    used_in_training = recorder.take()
    assert len(sampled) == len(used_in_training) == 6
    training_classes = set().union(*(drawn_classes(i, drawings) for i in used_in_training))
    assert training_classes == set().union(*(drawn_classes(i, drawings) for i in sampled))
    assert_only_from(training_classes, split, "meta_train")
    assert len(training_classes) > trainer.train_n_way  # tasks vary: not one fixed class set

    # (b) validation tasks: the fixed set drawn at start-up, and what `validate` scores.
    assert_only_from(drawn_classes(trainer.validation_index, drawings), split, "validation")
    trainer.validate()
    used_in_validation = recorder.take()
    assert used_in_validation, "validate() materialised no tasks"
    for index in used_in_validation:
        assert_only_from(drawn_classes(index, drawings), split, "validation")
    assert not sampled[6:], "validation must not sample new tasks"


def test_trainer_shows_rotated_meta_train_classes_turned_and_validates_unrotated(
    arrays, tmp_path, monkeypatch
):
    """Under rotations=meta_train, the tasks `Trainer.step` hands the learner use rotated
    classes, each image the stored drawing turned by its class's quarter turns
    (`torch.rot90`), while validation classes are unrotated."""
    params = train_params(SPLITS["lake_rotated"])
    split = make_split(arrays.character_origin, params.data.split)
    trainer = training.Trainer("proto", params, arrays, split, tmp_path, progress=False)
    recorder = MaterializeRecorder()
    monkeypatch.setattr(training, "materialize", recorder)
    for _ in range(4):
        trainer.step()
    size, turns_seen = arrays.image_size, set()
    for index, episodes in zip(recorder.indices, recorder.outputs, strict=True):
        tasks, n_way, _ = index.image_index.shape
        support = episodes.support_x.view(tasks, n_way, index.k_shot, size, size)
        query = episodes.query_x.view(tasks, n_way, -1, size, size)
        for task in range(tasks):
            for way in range(n_way):
                turns = int(index.rotation[task, way])
                turns_seen.add(turns)
                stored = arrays.images[index.image_index[task, way]].float() / 255
                expected = torch.rot90(stored, turns, dims=(-2, -1))
                got = torch.cat([support[task, way], query[task, way]])
                assert torch.equal(got, expected), (task, way, turns)
    assert turns_seen == {0, 1, 2, 3}
    assert set(trainer.validation_index.rotation.flatten().tolist()) == {0}


# ----------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("protocol", SPLITS)
def test_stored_evaluation_episodes_use_only_meta_test_classes(protocol, arrays, tmp_path):
    split = make_split(arrays.character_origin, SplitConfig(**SPLITS[protocol]))
    config = EpisodesConfig(settings=["5w1s", "3w2s"], num_episodes=20, query_per_class=3, seed=4)
    written = write_evaluation_episodes(tmp_path, split, arrays.drawings_per_character, config)
    assert set(written) == {"5w1s", "3w2s"}
    for setting, path in written.items():
        index, metadata = load_episode_set(path)
        assert index.num_tasks == 20 and metadata["part"] == "meta_test", setting
        drawn = drawn_classes(index, arrays.drawings_per_character)
        assert_only_from(drawn, split, "meta_test")
        if protocol == "lake":  # meta-test = the evaluation alphabets
            assert all(arrays.character_origin[c] == 1 for c, _ in drawn)


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_episodes_stage(directory: Path, prefetched: Path, split_config: dict) -> DataParams:
    """Run stages/episodes.py in `directory` on a copy of `prefetched`; its params."""
    (directory / PREFETCHED_FILE).parent.mkdir(parents=True)
    shutil.copy(prefetched, directory / PREFETCHED_FILE)
    params = DataParams.model_validate(
        {
            "data": {"split": split_config},
            "episodes": {"settings": ["5w1s", "3w2s"], "num_episodes": 30, "query_per_class": 2},
            "tracking": {"enabled": False},
        }
    )
    stage = load_stage("episodes")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        stage.main(argparse.Namespace(no_progress=True), params)
    return params


def test_episodes_stage_stores_only_meta_test_classes(arrays, tiny_prefetched_28, tmp_path):
    """The same through the stage script (its own make_split and paths)."""
    params = run_episodes_stage(tmp_path, tiny_prefetched_28, SPLITS["lake"])
    split = make_split(arrays.character_origin, params.data.split)
    index, _ = load_episode_set(tmp_path / "data" / "episodes" / "5w1s.npz")
    assert_only_from(drawn_classes(index, arrays.drawings_per_character), split, "meta_test")


def test_meta_train_rotations_leave_the_stored_test_episodes_byte_identical(
    arrays, tiny_prefetched_28, tmp_path
):
    """rotations=meta_train changes what meta-training draws from (x4 classes), not the
    fixed test tasks: the episodes stage writes the same bytes with and without it."""
    run_episodes_stage(tmp_path / "plain", tiny_prefetched_28, SPLITS["lake"])
    run_episodes_stage(tmp_path / "rotated", tiny_prefetched_28, SPLITS["lake_rotated"])
    plain = sorted((tmp_path / "plain" / "data" / "episodes").iterdir())
    rotated = sorted((tmp_path / "rotated" / "data" / "episodes").iterdir())
    assert [f.name for f in plain] == [f.name for f in rotated] == ["3w2s.npz", "5w1s.npz"]
    for a, b in zip(plain, rotated, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    # ... while the split really differs where it should (else this proves nothing).
    counts = [
        make_split(arrays.character_origin, SplitConfig(**SPLITS[name])).summary()
        for name in ("lake", "lake_rotated")
    ]
    assert counts[1]["meta_train"]["classes"] == 4 * counts[0]["meta_train"]["classes"]
    assert counts[1]["meta_test"] == counts[0]["meta_test"]


# ----------------------------------------------------------------------- pretraining
def row_coded(arrays: OmniglotArrays) -> OmniglotArrays:
    """``arrays`` with every image replaced by its own row number (pixels [0, 0] and
    [0, 1] hold row // 256 and row % 256), so that any returned image names its row."""
    rows = torch.arange(arrays.images.shape[0])
    images = torch.zeros_like(arrays.images)
    images[:, 0, 0] = (rows // 256).to(torch.uint8)
    images[:, 0, 1] = (rows % 256).to(torch.uint8)
    return dataclasses.replace(arrays, images=images)


def decode_rows(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0].long() * 256 + images[:, 0, 1].long()


def assert_all_and_only_meta_train_drawings(
    images: torch.Tensor, labels: torch.Tensor, arrays: OmniglotArrays, split: Split
) -> None:
    drawings = arrays.drawings_per_character
    rows = decode_rows(images)
    assert rows.unique().numel() == rows.numel(), "a drawing is repeated"
    characters = set((rows // drawings).tolist())
    for part in ("validation", "meta_test"):
        leaked = characters & set(getattr(split, part)[:, 0].tolist())
        assert not leaked, f"pretraining sees {part} characters {sorted(leaked)}"
    # Every drawing of every meta-train character (and nothing else).
    meta_train = split.meta_train[:, 0].unique()
    assert characters == set(meta_train.tolist())
    assert rows.numel() == meta_train.numel() * drawings
    # Labels name the character: one label per character, distinct across characters.
    pairs = set(zip(labels.tolist(), (rows // drawings).tolist(), strict=True))
    assert len(pairs) == len({c for _, c in pairs}) == len({label for label, _ in pairs})


@pytest.mark.parametrize("protocol", SPLITS)
def test_pretraining_sees_only_meta_train_characters(protocol, arrays):
    coded = row_coded(arrays)
    split = make_split(coded.character_origin, SplitConfig(**SPLITS[protocol]))
    images, labels = meta_train_drawings(coded, split)
    assert images.shape[1:] == arrays.images.shape[1:] and labels.shape == images.shape[:1]
    assert_all_and_only_meta_train_drawings(images, labels, coded, split)


def test_pretrain_stage_trains_only_on_meta_train_characters(arrays, tmp_path, monkeypatch):
    """Through the stage script: what reaches `pretrain_body` (the training images)."""
    coded = row_coded(arrays)
    stage = load_stage("pretrain")
    seen = {}

    def recording_pretrain_body(model_config, images, labels, **kwargs):
        seen.update(images=images, labels=labels)
        seen.update(held_out=kwargs["validation_images"], held_labels=kwargs["validation_labels"])
        kwargs.update(validation_images=None, validation_labels=None)
        return pretrain.pretrain_body(model_config, images[:8], labels[:8], **kwargs)

    monkeypatch.setattr(stage, "load_prefetched", lambda path: coded)
    monkeypatch.setattr(stage, "pretrain_body", recording_pretrain_body)
    monkeypatch.chdir(tmp_path)
    params = PretrainParams.model_validate(
        {
            "data": {"split": SPLITS["lake"]},
            "pretrain": {"model": {"name": "conv4", "hidden": 4}, "epochs": 1, "batch_size": 8},
            "tracking": {"enabled": False},
        }
    )
    stage.main(argparse.Namespace(no_progress=True), params)
    split = make_split(coded.character_origin, params.data.split)
    # Training and held-out drawings together: every drawing of the meta-train characters
    # once (so the two are disjoint), one label per character across both.
    assert seen["held_out"].shape[0] > 0
    assert_all_and_only_meta_train_drawings(
        torch.cat([seen["images"], seen["held_out"]]),
        torch.cat([seen["labels"], seen["held_labels"]]),
        coded,
        split,
    )
    assert (tmp_path / "models" / "pretrain" / "body.pt").is_file()
