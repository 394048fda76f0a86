"""Class splits: the parts never overlap, counts follow the protocols, seeds decide."""

import pytest
import torch

from metalab.data.config import DataConfig, SplitConfig, load_data_params, split_classes
from metalab.data.splits import make_split
from metalab.schema import ParamsError

# Omniglot's real layout: 964 background characters, then 659 evaluation characters.
ORIGIN = torch.cat([torch.zeros(964, dtype=torch.long), torch.ones(659, dtype=torch.long)])


def characters(classes: torch.Tensor) -> set[int]:
    return set(classes[:, 0].tolist())


# Characters per part (meta-train, validation, meta-test) under the default counts.
PART_CHARACTERS = {"lake": [864, 100, 659], "vinyals": [1028, 172, 423]}


# Which parts come in four quarter turns, per (protocol, data.split.rotations).
ROTATED = {
    ("lake", None): set(),
    ("lake", "none"): set(),
    ("lake", "meta_train"): {"meta_train"},
    ("lake", "all"): {"meta_train", "validation", "meta_test"},
    ("vinyals", None): {"meta_train", "validation", "meta_test"},
    ("vinyals", "meta_train"): {"meta_train"},
}


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize(("protocol", "rotations"), list(ROTATED))
def test_parts_never_share_a_character(protocol, rotations, seed):
    """Each of the 1623 characters is in exactly one part, with all its classes (every
    rotation in a rotated part, rotation 0 only elsewhere), under both protocols."""
    split = make_split(ORIGIN, SplitConfig(protocol=protocol, seed=seed, rotations=rotations))
    parts = [characters(p) for p in split.parts().values()]
    train, validation, test = parts
    assert not train & validation and not train & test and not validation & test
    assert train | validation | test == set(range(1623))
    assert [len(part) for part in parts] == PART_CHARACTERS[protocol]
    for part, classes in split.parts().items():
        turns = 4 if part in ROTATED[protocol, rotations] else 1
        assert len(set(map(tuple, classes.tolist()))) == classes.shape[0]  # no class twice
        assert classes.shape[0] == len(characters(classes)) * turns
        assert set(classes[:, 1].tolist()) == set(range(turns))


@pytest.mark.parametrize("protocol", ["lake", "vinyals"])
def test_meta_train_rotations_change_only_the_meta_train_part(protocol):
    """rotations=meta_train: the meta-train part is its unrotated classes x4 (each character
    in quarter turns 0-3, character-major), validation and meta-test are exactly the
    unrotated split's tensors (so the stored test episodes cannot change)."""
    base = make_split(ORIGIN, SplitConfig(protocol=protocol, rotations="none"))
    rotated = make_split(ORIGIN, SplitConfig(protocol=protocol, rotations="meta_train"))
    assert torch.equal(rotated.validation, base.validation)
    assert torch.equal(rotated.meta_test, base.meta_test)
    assert rotated.meta_train.shape[0] == 4 * base.meta_train.shape[0]
    grid = rotated.meta_train.view(-1, 4, 2)
    assert torch.equal(grid[:, :, 0], base.meta_train[:, :1].expand(-1, 4))
    assert torch.equal(grid[:, :, 1], torch.arange(4).expand(grid.shape[0], 4))


@pytest.mark.parametrize("protocol", ["lake", "vinyals"])
@pytest.mark.parametrize("rotations", [None, "none", "meta_train", "all"])
def test_params_class_counts_match_the_split(protocol, rotations):
    """`split_classes` (what params validation checks n_way against) counts the classes
    `make_split` really makes, for every rotation mode."""
    data = DataConfig(split=SplitConfig(protocol=protocol, rotations=rotations))
    split = make_split(ORIGIN, data.split)
    assert split_classes(data) == {p: c.shape[0] for p, c in split.parts().items()}


def test_rotations_accepts_the_old_booleans_and_names_a_bad_value(tmp_path):
    """true/false (the key's former type) still mean every part / no part; anything else
    is a one-line params error naming the key and the allowed values."""
    assert SplitConfig(rotations=True).rotated_parts == {"meta_train", "validation", "meta_test"}
    assert SplitConfig(rotations=False, protocol="vinyals").rotated_parts == set()
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  split:\n    rotations: train\n")
    with pytest.raises(ParamsError) as error:
        load_data_params(path)
    message = str(error.value)
    assert "data.split.rotations" in message and "'meta_train'" in message
    assert "\n" not in message


def test_lake_uses_background_for_training_and_evaluation_for_testing():
    split = make_split(ORIGIN, SplitConfig(protocol="lake", validation_characters=100))
    assert all(ORIGIN[c] == 0 for c in characters(split.meta_train) | characters(split.validation))
    assert characters(split.meta_test) == set(range(964, 1623))
    assert split.summary()["validation"]["characters"] == 100
    assert split.summary()["meta_train"]["classes"] == 864
    assert set(split.meta_train[:, 1].tolist()) == {0}  # no rotations by default


def test_vinyals_counts_and_rotations():
    split = make_split(ORIGIN, SplitConfig(protocol="vinyals"))
    summary = split.summary()
    assert [summary[p]["characters"] for p in ("meta_train", "validation", "meta_test")] == [
        1028,
        172,
        423,
    ]
    assert [summary[p]["classes"] for p in ("meta_train", "validation", "meta_test")] == [
        4112,
        688,
        1692,
    ]
    assert set(split.meta_test[:, 1].tolist()) == {0, 1, 2, 3}


def test_seed_decides_the_split():
    a = make_split(ORIGIN, SplitConfig(protocol="vinyals", seed=1))
    b = make_split(ORIGIN, SplitConfig(protocol="vinyals", seed=1))
    c = make_split(ORIGIN, SplitConfig(protocol="vinyals", seed=2))
    assert torch.equal(a.meta_test, b.meta_test)
    assert not torch.equal(a.meta_test, c.meta_test)


def test_impossible_counts_are_params_errors():
    with pytest.raises(ParamsError, match="validation_characters"):
        make_split(ORIGIN, SplitConfig(protocol="lake", validation_characters=964))
    with pytest.raises(ParamsError, match="vinyals_train_characters"):
        make_split(ORIGIN, SplitConfig(protocol="vinyals", vinyals_train_characters=1500))
