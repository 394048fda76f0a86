"""Typed schemas of the metrics files the stages write and the report reads.

One pydantic model per file kind under metrics/. Each record is written as a pair: the
metrics file, declared as a DVC metric, holds its numbers only (ints, floats, booleans,
null for an unknown number; nested objects of them); the info file beside it,
``<name>.info.json`` (a plain DVC output, committed like the metrics), holds its text
(names, hashes, paths, run ids, device names, reasons):

==============================  ====================  =====================  ===================
metrics file                    schema                written by             info file has
==============================  ====================  =====================  ===================
metrics/data.json               `DataMetrics`         stages/download.py     sources, sha256
metrics/prefetch.json           `PrefetchMetrics`     stages/prefetch.py     (no info file)
metrics/episodes.json           `EpisodesMetrics`     stages/episodes.py     protocol, set paths
metrics/pretrain.json           `PretrainMetrics`     stages/pretrain.py     network, precision,
                                                                             device, run id
metrics/train/<name>.json       `TrainSummary`        stages/train.py        names, precision,
                                                                             device, run id
metrics/eval/<name>.json        `EvaluationMetrics`   stages/evaluate.py     names, episode set
                                                                             fingerprints,
                                                                             unsupported, device,
                                                                             run ids
metrics/train_rl/<name>.json    `RLTrainSummary`      stages/train_rl.py     names, env, device,
                                                                             run id
metrics/eval_rl/<name>.json     `RLEvaluationMetrics` stages/evaluate_rl.py  names, env, device
                                                                             step schedule
==============================  ====================  =====================  ===================

A field's file follows from its declared type (`metalab.records.base.part_of`): numbers go
to the metrics file, str to the info file, and a nested model holding both (an evaluation
setting, a downloaded archive) is split key by key, keeping its key in both files. A
schema with a field of any other type fails when it is defined.

Every schema reads a pair with ``read(path)`` (`path` is the metrics file; the two are
merged into one record, and any problem with either is a `MetricsFileError` whose one-line
message names the file) and writes it with ``write(path)``, each file atomically.
``file_texts()`` are the two files' exact texts (``metalab.io.write_json``'s layout: the
record's keys in order, 2-space indent, trailing newline), so a committed pair read and
written back is identical byte for byte; ``to_json()`` and ``from_json_text()`` are the
whole record as one JSON object.

Non-finite numbers become ``None`` (JSON null) in the fields that allow it, because dvc
and browsers reject NaN in JSON; required numbers must be finite.

The train and evaluation summaries also record where the stage computed (`DEVICE_FIELDS`:
``device``, ``device_name``, ``threads``, ``torch_version``, ``cuda_version``, as
`metalab.device.DeviceRecord` has them) and, on a CUDA device, its allocator's peaks
(``gpu_peak_allocated_mb``, ``gpu_peak_reserved_mb``). These fields came later: they are
optional, and a field of a schema's ``omitted_when_none`` that is None is left out of the
files (so files written before them, and CPU runs' GPU figures, stay as they were).

This is a low layer: pydantic, the standard library and `metalab.io` (no torch).
"""

from __future__ import annotations

from pathlib import Path

from metalab.records.base import (
    DEVICE_FIELDS,
    INFO_SUFFIX,
    MetricsFile,
    MetricsFileError,
    OptionalFloat,
    Part,
    info_path,
    is_info_file,
    part_of,
)
from metalab.records.data import (
    ArchiveSummary,
    DataMetrics,
    EpisodesMetrics,
    PrefetchMetrics,
    SplitPartCounts,
)
from metalab.records.pretrain import PretrainMetrics
from metalab.records.rl import (
    BEFORE_ADAPTATION_KEY,
    META_LEARNED,
    AdaptationReturn,
    RLEvaluationMetrics,
    RLTrainSummary,
    adaptation_key,
    adaptation_steps_of,
)
from metalab.records.vision import (
    EvaluationMetrics,
    SettingResult,
    TrainRunReference,
    TrainSummary,
)

SCHEMAS: dict[str, type[MetricsFile]] = {
    "data.json": DataMetrics,
    "prefetch.json": PrefetchMetrics,
    "episodes.json": EpisodesMetrics,
    "pretrain.json": PretrainMetrics,
    "train/*.json": TrainSummary,
    "eval/*.json": EvaluationMetrics,
    "train_rl/*.json": RLTrainSummary,
    "eval_rl/*.json": RLEvaluationMetrics,
}
"""{pattern relative to metrics/: schema} of every metrics file (not the info files)."""


def schema_for(relative_path: str | Path) -> type[MetricsFile] | None:
    """The schema of a metrics file given by its path relative to metrics/ (None if
    unknown, and for an info file: it is read with its metrics file)."""
    path = Path(relative_path)
    if is_info_file(path):
        return None
    for pattern, schema in SCHEMAS.items():
        if path.match(pattern) and len(path.parts) == len(Path(pattern).parts):
            return schema
    return None


def metrics_files(directory: str | Path) -> list[Path]:
    """The metrics files directly in `directory` (``*.json`` without the info files),
    sorted; none if it does not exist."""
    return sorted(path for path in Path(directory).glob("*.json") if not is_info_file(path))


__all__ = [
    "BEFORE_ADAPTATION_KEY",
    "DEVICE_FIELDS",
    "INFO_SUFFIX",
    "META_LEARNED",
    "SCHEMAS",
    "AdaptationReturn",
    "ArchiveSummary",
    "DataMetrics",
    "EpisodesMetrics",
    "EvaluationMetrics",
    "MetricsFile",
    "MetricsFileError",
    "OptionalFloat",
    "Part",
    "PrefetchMetrics",
    "PretrainMetrics",
    "RLEvaluationMetrics",
    "RLTrainSummary",
    "SettingResult",
    "SplitPartCounts",
    "TrainRunReference",
    "TrainSummary",
    "adaptation_key",
    "adaptation_steps_of",
    "info_path",
    "is_info_file",
    "metrics_files",
    "part_of",
    "schema_for",
]
