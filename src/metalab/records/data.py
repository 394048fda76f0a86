"""The data stages' records: metrics/data.json, metrics/prefetch.json, metrics/episodes.json
(and the info files beside the first and the last)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, RootModel

from metalab.records.base import MetricsFile, Schema


class ArchiveSummary(Schema):
    """One downloaded Omniglot archive."""

    source: str = Field(description="where the archive came from (URL or local folder)")
    sha256: str = Field(description="SHA-256 of the archive file")
    size_bytes: int = Field(description="archive size in bytes")
    alphabets: int = Field(description="alphabets in the archive")
    characters: int = Field(description="characters (classes before rotation) in the archive")
    drawings: int = Field(description="drawings (images) in the archive")


class DataMetrics(MetricsFile, RootModel[dict[str, ArchiveSummary]]):
    """metrics/data.json: {archive name: `ArchiveSummary`} (images_background, ...)."""

    description: ClassVar[str] = "download summary"

    @property
    def archives(self) -> dict[str, ArchiveSummary]:
        return self.root


class PrefetchMetrics(Schema):
    """metrics/prefetch.json: what the prefetch stage decoded."""

    description: ClassVar[str] = "prefetch summary"

    images: int = Field(description="images decoded")
    characters: int = Field(description="characters (classes before rotation)")
    alphabets: int = Field(description="alphabets")
    image_size: int = Field(description="side of the square images, pixels")
    seconds: float = Field(description="wall time of the decoding, seconds (2 decimals)")


class SplitPartCounts(Schema):
    """Classes and distinct characters of one part of the class split."""

    classes: int = Field(description="classes (character, rotation) in this part")
    characters: int = Field(description="distinct characters in this part")


class EpisodesMetrics(Schema):
    """metrics/episodes.json: the class split and the stored meta-test episode sets."""

    description: ClassVar[str] = "episodes summary"

    protocol: str = Field(description="split protocol of data.split.protocol (lake, vinyals)")
    split: dict[str, SplitPartCounts] = Field(
        description="{part: counts} for meta_train, validation, meta_test"
    )
    episode_sets: dict[str, str] = Field(description="{setting: path of its .npz episode set}")
