"""The data sections of params.yaml: ``data`` (archives, image size, class split) and
``episodes`` (the stored meta-test tasks), beside the code that reads them.

`load_data_params` reads just these sections (plus ``tracking``), so the data stages
(download, prefetch, episodes) validate what they read without loading the learners.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from metalab.data.archives import OFFICIAL_COUNTS, OFFICIAL_URL, ArchiveCounts
from metalab.schema import Sections, Strict, TrackingConfig, load_sections

SETTING_PATTERN = re.compile(r"^(\d+)w(\d+)s$")
DEFAULT_SOURCES = ("../shared/data/omniglot", OFFICIAL_URL)


class SplitConfig(Strict):
    """``data.split``: which characters meta-train, validate and meta-test."""

    protocol: Literal["lake", "vinyals"] = Field(
        "lake",
        description="lake: background alphabets train / evaluation alphabets test; "
        "vinyals: all characters pooled, 1028/172/423, rotations as extra classes",
    )
    seed: int = Field(0, ge=0)
    validation_characters: int = Field(
        100, ge=1, description="lake: background characters held out for validation"
    )
    vinyals_train_characters: int = Field(1028, ge=1)
    vinyals_validation_characters: int = Field(172, ge=1)
    rotations: bool | None = Field(
        None,
        description="90-degree rotations as extra classes; null = protocol default "
        "(vinyals: true, lake: false)",
    )

    @property
    def use_rotations(self) -> bool:
        return self.protocol == "vinyals" if self.rotations is None else self.rotations


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


class DataParams(Sections):
    """The sections a data stage reads; the learners' sections are left to their stages."""

    data: DataConfig = Field(default_factory=DataConfig)
    episodes: EpisodesConfig = Field(default_factory=EpisodesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def load_data_params(path: str | Path = "params.yaml") -> DataParams:
    """Read and validate params.yaml's data sections; `ParamsError` with a one-line message."""
    return load_sections(path, DataParams)
