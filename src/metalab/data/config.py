"""The data sections of params.yaml: ``data`` (archives, image size, class split) and
``episodes`` (the stored meta-test tasks), beside the code that reads them.

`load_data_params` reads just these sections (plus ``tracking``), so the data stages
(download, prefetch, episodes) validate what they read without loading the learners.
Besides each key's own range, load checks what the keys imply together: the split leaves
every part some characters (`split_classes`), and each episode set fits Omniglot (at most
`OMNIGLOT_DRAWINGS_PER_CHARACTER` shots + queries per class, no more ways than meta-test
classes; `check_episodes_fit`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from metalab.data.archives import OFFICIAL_COUNTS, OFFICIAL_URL, ArchiveCounts
from metalab.schema import Sections, Strict, TrackingConfig, field_error, load_sections

SETTING_PATTERN = re.compile(r"^(\d+)w(\d+)s$")
DEFAULT_SOURCES = ("../shared/data/omniglot", OFFICIAL_URL)

# Omniglot (Lake et al. 2015) has each of its 1623 characters drawn once by each of 20
# people: 20 images per class (the official archives: 19280 drawings of 964 background
# characters, 13180 of 659 evaluation characters; files NNNN_DD.png, drawer DD = 01..20).
# A task takes K shots + Q queries of a class without repeating a drawing, so K + Q <= 20.
OMNIGLOT_DRAWINGS_PER_CHARACTER = 20


def drawings_needed(k_shot: int, query_per_class: int) -> str | None:
    """Why `k_shot` shots + `query_per_class` queries cannot be drawn from one Omniglot
    class, or None when they can."""
    if k_shot + query_per_class <= OMNIGLOT_DRAWINGS_PER_CHARACTER:
        return None
    return (
        f"{k_shot} shots + {query_per_class} queries need {k_shot + query_per_class} "
        f"drawings per class; an Omniglot character has {OMNIGLOT_DRAWINGS_PER_CHARACTER}"
    )


# What each value of ``data.split.rotations`` rotates. Validation stays unrotated under
# "meta_train" on purpose: it stands in for the meta-test tasks (model selection, tuning,
# test-step choice), and those are unrotated characters.
ROTATED_PARTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "meta_train": ("meta_train",),
    "all": ("meta_train", "validation", "meta_test"),
}


class SplitConfig(Strict):
    """``data.split``: which characters meta-train, validate and meta-test."""

    protocol: Literal["lake", "vinyals"] = Field(
        "lake",
        description="lake: background alphabets train / evaluation alphabets test; "
        "vinyals: all characters pooled, 1028/172/423, rotated (see rotations)",
    )
    seed: int = Field(0, ge=0)
    validation_characters: int = Field(
        100, ge=1, description="lake: background characters held out for validation"
    )
    vinyals_train_characters: int = Field(1028, ge=1)
    vinyals_validation_characters: int = Field(172, ge=1)
    rotations: Literal["none", "meta_train", "all"] | None = Field(
        None,
        description="which parts get each 90-degree rotation of a character as a class of "
        "its own: none, meta_train (validation and meta-test unrotated) or all; "
        "null = protocol default (vinyals: all, lake: none)",
    )

    @field_validator("rotations", mode="before")
    @classmethod
    def _boolean_rotations(cls, value: object) -> object:
        # The key used to be a boolean (true = every part rotated); keep old files valid.
        if isinstance(value, bool):
            return "all" if value else "none"
        return value

    @property
    def rotated_parts(self) -> frozenset[str]:
        """The split parts ('meta_train', 'validation', 'meta_test') whose characters
        appear in all four quarter turns."""
        mode = self.rotations or ("all" if self.protocol == "vinyals" else "none")
        return frozenset(ROTATED_PARTS[mode])


class DataConfig(Strict):
    """``data``: where the archives come from, what they must hold, how images are stored."""

    sources: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SOURCES),
        min_length=1,
        description="tried in order: local mirror directories or http(s) base URLs",
    )
    download_timeout: float = Field(10.0, gt=0, le=600, description="seconds per request")
    expected: dict[Literal["images_background", "images_evaluation"], ArchiveCounts] = Field(
        default_factory=lambda: dict(OFFICIAL_COUNTS)
    )
    image_size: Literal[28, 105] = 28
    prefetch_workers: int = Field(2, ge=1, le=64)
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _split_fits_archives(self) -> DataConfig:
        split_classes(self)
        return self


def split_classes(data: DataConfig) -> dict[str, int] | None:
    """Classes in each split part ('meta_train', 'validation', 'meta_test') that `data`
    describes, counted from ``data.expected`` (the archives must match it) the way
    `metalab.data.splits.make_split` splits them; None when ``data.expected`` lacks an
    archive. Raises (a pydantic error naming the key) when a part would be empty."""
    if set(data.expected) != {"images_background", "images_evaluation"}:
        return None
    background = data.expected["images_background"].characters
    evaluation = data.expected["images_evaluation"].characters
    split = data.split
    if split.protocol == "lake":
        if split.validation_characters >= background:
            raise field_error(
                ("split", "validation_characters"),
                split.validation_characters,
                f"must be below the {background} background characters (data.expected)",
            )
        train, validation, test = (
            background - split.validation_characters,
            split.validation_characters,
            evaluation,
        )
    else:
        train, validation = split.vinyals_train_characters, split.vinyals_validation_characters
        test = background + evaluation - train - validation
        if test < 1:
            raise field_error(
                ("split", "vinyals_train_characters"),
                train,
                f"with vinyals_validation_characters {validation}: must leave meta-test "
                f"characters out of {background + evaluation} (data.expected)",
            )
    characters = {"meta_train": train, "validation": validation, "meta_test": test}
    rotated = split.rotated_parts
    return {part: count * (4 if part in rotated else 1) for part, count in characters.items()}


def parse_setting(setting: str) -> tuple[int, int]:
    """'5w1s' -> (n_way=5, k_shot=1)."""
    match = SETTING_PATTERN.match(setting)
    if not match:
        raise ValueError(f"{setting!r} is not of the form '<N>w<K>s', e.g. '5w1s'")
    n_way, k_shot = int(match.group(1)), int(match.group(2))
    if n_way < 2 or k_shot < 1:
        raise ValueError(f"{setting!r}: need at least 2 ways and 1 shot")
    return n_way, k_shot


class EpisodesConfig(Strict):
    """``episodes``: the fixed meta-test tasks every learner is scored on."""

    settings: list[str] = Field(
        default_factory=lambda: ["5w1s", "5w5s", "20w1s", "20w5s"], min_length=1
    )
    num_episodes: int = Field(600, ge=1, le=100_000)
    query_per_class: int = Field(15, ge=1, le=1000)
    seed: int = Field(2017, ge=0)

    @field_validator("settings")
    @classmethod
    def _valid_settings(cls, settings: list[str]) -> list[str]:
        for setting in settings:
            parse_setting(setting)
        if len(set(settings)) != len(settings):
            raise ValueError("settings must not repeat")
        return settings

    @model_validator(mode="after")
    def _enough_drawings(self) -> EpisodesConfig:
        for setting in self.settings:
            problem = drawings_needed(parse_setting(setting)[1], self.query_per_class)
            if problem:
                raise field_error(
                    ("settings",),
                    self.settings,
                    f"{setting}: {problem} (episodes.query_per_class)",
                )
        return self


def check_episodes_fit(data: DataConfig, episodes: EpisodesConfig) -> None:
    """Every episode set has at most as many ways as there are meta-test classes; raises a
    pydantic error at ``episodes.settings`` (for a model validator over both sections)."""
    classes = split_classes(data)
    if classes is None:
        return
    for setting in episodes.settings:
        n_way = parse_setting(setting)[0]
        if n_way > classes["meta_test"]:
            raise field_error(
                ("episodes", "settings"),
                episodes.settings,
                f"{setting}: {n_way}-way tasks need {n_way} classes; the meta-test split has "
                f"{classes['meta_test']} (data.split, data.expected)",
            )


class DataParams(Sections):
    """The sections a data stage reads; the learners' sections are left to their stages."""

    data: DataConfig = Field(default_factory=DataConfig)
    episodes: EpisodesConfig = Field(default_factory=EpisodesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _episodes_fit(self) -> DataParams:
        check_episodes_fit(self.data, self.episodes)
        return self


def load_data_params(path: str | Path = "params.yaml") -> DataParams:
    """Read and validate params.yaml's data sections; `ParamsError` with a one-line message."""
    return load_sections(path, DataParams)
