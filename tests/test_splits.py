"""Class splits: the parts never overlap, counts follow the protocols, seeds decide."""

import pytest
import torch

from metalab.data.config import SplitConfig
from metalab.data.splits import make_split
from metalab.schema import ParamsError

# Omniglot's real layout: 964 background characters, then 659 evaluation characters.
ORIGIN = torch.cat([torch.zeros(964, dtype=torch.long), torch.ones(659, dtype=torch.long)])


def characters(classes: torch.Tensor) -> set[int]:
    return set(classes[:, 0].tolist())


# Characters per part (meta-train, validation, meta-test) under the default counts.
PART_CHARACTERS = {"lake": [864, 100, 659], "vinyals": [1028, 172, 423]}


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize(
    ("protocol", "rotations"), [("lake", None), ("lake", True), ("vinyals", None)]
)
def test_parts_never_share_a_character(protocol, rotations, seed):
    """Each of the 1623 characters is in exactly one part, with all its classes (every
    rotation when rotations are on), under both protocols."""
    split = make_split(ORIGIN, SplitConfig(protocol=protocol, seed=seed, rotations=rotations))
    parts = [characters(p) for p in split.parts().values()]
    train, validation, test = parts
    assert not train & validation and not train & test and not validation & test
    assert train | validation | test == set(range(1623))
    assert [len(part) for part in parts] == PART_CHARACTERS[protocol]
    turns = 4 if protocol == "vinyals" or rotations else 1
    for classes in split.parts().values():
        assert len(set(map(tuple, classes.tolist()))) == classes.shape[0]  # no class twice
        assert classes.shape[0] == len(characters(classes)) * turns
        assert set(classes[:, 1].tolist()) == set(range(turns))


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
