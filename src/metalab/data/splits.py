"""Meta-train / validation / meta-test class splits of Omniglot.

A class is a (character, rotation) pair; rotation counts quarter turns (0-3). Two
protocols:

- ``lake`` (Lake et al. 2015): background alphabets for meta-training, minus a seeded
  held-out set of background characters for validation; evaluation alphabets for
  meta-testing. No rotations unless asked for.
- ``vinyals`` (Vinyals et al. 2016, used by MAML and ProtoNets): all characters pooled and
  shuffled with the split seed: 1028 meta-train, 172 validation, the rest (423) meta-test;
  each rotation by 90 degrees is a class of its own (x4).

``rotations`` chooses the parts whose characters come in all four quarter turns (see
`SplitConfig.rotated_parts`): ``meta_train`` augments the training classes only, so the
validation and meta-test classes, and so the stored test episodes, stay as without it.
Rotation never moves a character between parts: the characters are split first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalab.data.config import SplitConfig
from metalab.schema import ParamsError


@dataclass
class Split:
    """Class lists, each int64 [num_classes, 2] with columns (character, rotation)."""

    protocol: str
    meta_train: torch.Tensor
    validation: torch.Tensor
    meta_test: torch.Tensor

    def parts(self) -> dict[str, torch.Tensor]:
        return {
            "meta_train": self.meta_train,
            "validation": self.validation,
            "meta_test": self.meta_test,
        }

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts of classes and distinct characters per part (for metrics and logs)."""
        return {
            part: {
                "classes": int(classes.shape[0]),
                "characters": int(classes[:, 0].unique().numel()),
            }
            for part, classes in self.parts().items()
        }


def _with_rotations(characters: torch.Tensor, rotated: bool) -> torch.Tensor:
    """int64 [C * turns, 2] classes (character, quarter turns) of `characters` (int [C]),
    character-major; turns is 4 when `rotated`, else 1 (rotation 0 only)."""
    turns = torch.arange(4 if rotated else 1)
    grid = torch.cartesian_prod(characters, turns)
    return grid.reshape(-1, 2).long()


def make_split(character_origin: torch.Tensor, config: SplitConfig) -> Split:
    """Split characters into meta-train / validation / meta-test classes.

    ``character_origin``: int [C], 0 for a background character, 1 for evaluation.
    Deterministic for ``config.seed``; the three parts never share a character.
    """
    generator = torch.Generator().manual_seed(config.seed)
    num_characters = int(character_origin.shape[0])
    if config.protocol == "lake":
        background = torch.nonzero(character_origin == 0).flatten()
        evaluation = torch.nonzero(character_origin == 1).flatten()
        if config.validation_characters >= background.numel():
            raise ParamsError(
                f"params.yaml: data.split.validation_characters = {config.validation_characters}: "
                f"must be below the {background.numel()} background characters"
            )
        shuffled = background[torch.randperm(background.numel(), generator=generator)]
        validation = shuffled[: config.validation_characters].sort().values
        meta_train = shuffled[config.validation_characters :].sort().values
        meta_test = evaluation
    else:
        train_count = config.vinyals_train_characters
        validation_count = config.vinyals_validation_characters
        if train_count + validation_count >= num_characters:
            raise ParamsError(
                "params.yaml: data.split.vinyals_train_characters + vinyals_validation_characters "
                f"= {train_count + validation_count}: must leave meta-test characters out of "
                f"{num_characters}"
            )
        shuffled = torch.randperm(num_characters, generator=generator)
        meta_train = shuffled[:train_count].sort().values
        validation = shuffled[train_count : train_count + validation_count].sort().values
        meta_test = shuffled[train_count + validation_count :].sort().values
    rotated = config.rotated_parts
    return Split(
        protocol=config.protocol,
        meta_train=_with_rotations(meta_train, "meta_train" in rotated),
        validation=_with_rotations(validation, "validation" in rotated),
        meta_test=_with_rotations(meta_test, "meta_test" in rotated),
    )
