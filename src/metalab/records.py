"""Typed schemas of the metrics files the stages write and the report reads.

One pydantic model per file kind under metrics/:

========================================  =========================  =====================
file                                      schema                     written by
========================================  =========================  =====================
metrics/data.json                         `DataMetrics`              stages/download.py
metrics/prefetch.json                     `PrefetchMetrics`          stages/prefetch.py
metrics/episodes.json                     `EpisodesMetrics`          stages/episodes.py
metrics/train/<name>.json                 `TrainSummary`             stages/train.py
metrics/eval/<name>.json                  `EvaluationMetrics`        stages/evaluate.py
metrics/train_rl/<name>.json              `RLTrainSummary`           stages/train_rl.py
metrics/eval_rl/<name>.json               `RLEvaluationMetrics`      stages/evaluate_rl.py
========================================  =========================  =====================

Every schema reads a file with ``read(path)`` (any problem is a `MetricsFileError` whose
one-line message names the file) and renders it with ``to_json()``: exactly the text the
stages have always written (``metalab.io.write_json``: the same keys in the same order,
2-space indent, trailing newline), so a committed file read and written back is identical
byte for byte. ``write(path)`` writes that text atomically.

Non-finite numbers become ``None`` (JSON null) in the fields that allow it, because dvc
and browsers reject NaN in JSON; required numbers must be finite.

The train and evaluation summaries also record where the stage computed (`DEVICE_FIELDS`:
``device``, ``device_name``, ``threads``, ``torch_version``, ``cuda_version``, as
`metalab.device.DeviceRecord` has them) and, on a CUDA device, its allocator's peaks
(``gpu_peak_allocated_mb``, ``gpu_peak_reserved_mb``). These fields came later: they are
optional, and a field of a schema's ``omitted_when_none`` that is None is left out of the
file (so files written before them, and CPU runs' GPU figures, stay as they were).

This is a low layer: pydantic, the standard library and `metalab.io` (no torch).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from metalab.io import write_text


class MetricsFileError(ValueError):
    """A metrics file is missing, is not JSON, or does not match its schema.

    The message is one line and starts with the file's path.
    """


def _finite_or_none(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); everything else is left to the type check."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


OptionalFloat = Annotated[float | None, BeforeValidator(_finite_or_none)]
"""A number that may be unknown: null in the file, None here (NaN/inf are stored as null)."""


def _one_line(error: ValidationError, location: Callable[[tuple], str], limit: int = 3) -> str:
    """'where: message; where: message (and N more)' for the first `limit` problems."""
    problems = error.errors(include_url=False)
    parts = [f"{location(problem['loc'])}: {problem['msg']}" for problem in problems[:limit]]
    text = "; ".join(parts)
    if len(problems) > limit:
        text += f" (and {len(problems) - limit} more)"
    return " ".join(text.split())  # messages never span lines


class MetricsFile:
    """Reading, rendering and writing shared by every metrics schema (a mixin of the
    pydantic models below)."""

    description: ClassVar[str] = "metrics file"
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()
    """Fields left out of the file when None (rather than written as null)."""

    @classmethod
    def from_json_text(cls, text: str, source: str | Path = "<text>") -> Self:
        """Parse and validate JSON `text`; `source` names it in the error message.

        Validation is strict (a string is never taken for a number), so what is read is
        what the file says.
        """
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise MetricsFileError(f"{source}: not valid JSON ({error})") from None
        if not isinstance(content, dict):
            raise MetricsFileError(f"{source}: not a JSON object (a {cls.description} is one)")
        try:
            return cls.model_validate(content, strict=True)  # type: ignore[attr-defined]
        except ValidationError as error:
            raise MetricsFileError(
                f"{source}: not a valid {cls.description}: {_one_line(error, cls.error_location)}"
            ) from None

    @classmethod
    def error_location(cls, location: tuple) -> str:
        """Where a validation problem is, as the file's keys ('settings.5w1s.accuracy')."""
        return ".".join(str(part) for part in location) or "(top level)"

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """The validated content of `path`; `MetricsFileError` (one line naming the file)
        if it is missing, unreadable, not JSON or not of this schema."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MetricsFileError(f"{path}: missing ({cls.description})") from None
        except (OSError, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())
            raise MetricsFileError(f"{path}: unreadable ({reason})") from None
        return cls.from_json_text(text, path)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, keys in file order (without the `omitted_when_none`
        fields that are None)."""
        data = self.model_dump(mode="python")  # type: ignore[attr-defined]
        if self.omitted_when_none:
            data = {
                key: value
                for key, value in data.items()
                if not (value is None and key in self.omitted_when_none)
            }
        return data

    def to_json(self) -> str:
        """The file's exact text (as `metalab.io.write_json` writes it)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def write(self, path: str | Path) -> None:
        """Write `to_json()` to `path` atomically."""
        write_text(path, self.to_json())


class _Schema(MetricsFile, BaseModel):
    """A metrics file whose keys are all known: anything else is an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


# Where a stage computed (`metalab.device.DeviceRecord`) and its GPU allocator's peaks
# (`metalab.tracking.memory_figures`); see the module docstring.
Device = Annotated[str | None, Field(description="torch device: cpu or cuda:N")]
DeviceName = Annotated[str | None, Field(description="the GPU's or the CPU's model")]
Threads = Annotated[int | None, Field(description="torch threads of the process")]
TorchVersion = Annotated[str | None, Field(description="torch version")]
CudaVersion = Annotated[
    str | None, Field(description="the CUDA torch is built with; None for a CPU build")
]
GpuPeakAllocated = Annotated[
    OptionalFloat, Field(description="peak memory allocated on the GPU, MB; None on the CPU")
]
GpuPeakReserved = Annotated[
    OptionalFloat,
    Field(description="peak memory reserved by the GPU's allocator, MB; None on the CPU"),
]

DEVICE_FIELDS = frozenset(
    "device device_name threads torch_version cuda_version gpu_peak_allocated_mb "
    "gpu_peak_reserved_mb".split()
)
"""The device and GPU memory fields of the train and evaluation summaries (each left out of
the file when None)."""


# ------------------------------------------------------------------------- data stages
class ArchiveSummary(_Schema):
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


class PrefetchMetrics(_Schema):
    """metrics/prefetch.json: what the prefetch stage decoded."""

    description: ClassVar[str] = "prefetch summary"

    images: int = Field(description="images decoded")
    characters: int = Field(description="characters (classes before rotation)")
    alphabets: int = Field(description="alphabets")
    image_size: int = Field(description="side of the square images, pixels")
    seconds: float = Field(description="wall time of the decoding, seconds (2 decimals)")


class SplitPartCounts(_Schema):
    """Classes and distinct characters of one part of the class split."""

    classes: int = Field(description="classes (character, rotation) in this part")
    characters: int = Field(description="distinct characters in this part")


class EpisodesMetrics(_Schema):
    """metrics/episodes.json: the class split and the stored meta-test episode sets."""

    description: ClassVar[str] = "episodes summary"

    protocol: str = Field(description="split protocol of data.split.protocol (lake, vinyals)")
    split: dict[str, SplitPartCounts] = Field(
        description="{part: counts} for meta_train, validation, meta_test"
    )
    episode_sets: dict[str, str] = Field(description="{setting: path of its .npz episode set}")


# ------------------------------------------------------------------------- vision track
class TrainSummary(_Schema):
    """metrics/train/<name>.json: `metalab.training.Trainer.summary()` plus the stage's
    peak memory and MLflow run id."""

    description: ClassVar[str] = "train summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS

    experiment: str = Field(description="experiment name (params.yaml `experiments` key)")
    algorithm: str = Field(description="meta-learning algorithm")
    iterations: int = Field(description="meta-iterations done")
    tasks: int = Field(description="meta-training tasks seen (iterations x meta-batch size)")
    final_loss: OptionalFloat = Field(description="meta-loss of the last iteration; None if none")
    min_loss: OptionalFloat = Field(description="lowest meta-loss of any iteration")
    final_train_accuracy: OptionalFloat = Field(
        description="query accuracy of the last training iteration (fraction)"
    )
    best_validation_accuracy: float = Field(
        description="best validation accuracy (fraction); -1 if never validated"
    )
    best_iteration: int = Field(description="iteration of the best validation; -1 if none")
    training_seconds: float = Field(description="busy time of the training loop, seconds")
    tasks_per_s: float = Field(description="meta-training tasks per busy second")
    total_parameters: int = Field(description="meta-parameters")
    trainable_parameters: int = Field(description="meta-parameters with a learning rate > 0")
    parameters_per_training_task: float = Field(description="trainable parameters / tasks")
    precision: str = Field(description="training precision (fp32, bf16, ...)")
    processes: int = Field(description="training processes (1 unless torchrun)")
    peak_memory_mb: float = Field(description="peak memory (host RSS) of the train stage, MB")
    gpu_peak_allocated_mb: GpuPeakAllocated = None
    gpu_peak_reserved_mb: GpuPeakReserved = None
    device: Device = None
    device_name: DeviceName = None
    threads: Threads = None
    torch_version: TorchVersion = None
    cuda_version: CudaVersion = None
    mlflow_run_id: str | None = Field(description="MLflow run of the stage; None if untracked")


class TrainRunReference(MetricsFile, BaseModel):
    """The one field of metrics/train/<name>.json the evaluate stage needs: the MLflow run
    of the training, to nest the evaluation run under it. Other keys are ignored, so an
    older or partial train summary still links the runs."""

    model_config = ConfigDict(extra="ignore")
    description: ClassVar[str] = "train summary"

    mlflow_run_id: str | None = Field(default=None, description="MLflow run of the training")


class SettingResult(_Schema):
    """Held-out accuracy of one learner on one setting's episode set (fractions; the 95%
    half-widths are 1.96 * s / sqrt(n), None for fewer than two episodes)."""

    n_way: int = Field(description="classes per task")
    k_shot: int = Field(description="support examples per class")
    episodes: int = Field(description="tasks evaluated")
    adaptation_steps: int | None = Field(
        description="test-time gradient steps; None for learners that do not adapt by gradient"
    )
    accuracy: OptionalFloat = Field(description="mean query accuracy after adaptation")
    ci95: OptionalFloat = Field(description="95% half-width of `accuracy`")
    accuracy_before: OptionalFloat = Field(
        description="mean query accuracy before adaptation (0 steps); None if not meaningful"
    )
    ci95_before: OptionalFloat = Field(description="95% half-width of `accuracy_before`")
    gain: OptionalFloat = Field(description="mean per-episode accuracy after - before")
    gain_ci95: OptionalFloat = Field(description="95% half-width of `gain` (paired)")
    seconds_per_episode: OptionalFloat = Field(
        description="mean seconds of adaptation + prediction per episode"
    )
    episode_set: str = Field(
        description="fingerprint of the episode set: equal fingerprints can be paired"
    )


class EvaluationMetrics(_Schema):
    """metrics/eval/<name>.json: `metalab.evaluation.LearnerEvaluation` summarised."""

    description: ClassVar[str] = "evaluation summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS

    experiment: str = Field(description="experiment name")
    algorithm: str = Field(description="meta-learning algorithm")
    settings: dict[str, SettingResult] = Field(
        description="{setting: result} of every evaluated setting, in evaluation order"
    )
    unsupported: dict[str, str] = Field(
        description="{setting: why the learner cannot do it} for settings not evaluated"
    )
    evaluation_seconds: float = Field(description="sum of the per-episode seconds")
    episodes: int = Field(description="episodes evaluated over all settings")
    peak_memory_mb: OptionalFloat = Field(
        default=None, description="peak memory (host RSS) of the evaluate stage, MB"
    )
    gpu_peak_allocated_mb: GpuPeakAllocated = None
    gpu_peak_reserved_mb: GpuPeakReserved = None
    device: Device = None
    device_name: DeviceName = None
    threads: Threads = None
    torch_version: TorchVersion = None
    cuda_version: CudaVersion = None
    train_run_id: str | None = Field(default=None, description="MLflow run of the training")
    mlflow_run_id: str | None = Field(default=None, description="MLflow run of the evaluation")


# ------------------------------------------------------------------------- meta-RL track
class RLTrainSummary(_Schema):
    """metrics/train_rl/<name>.json: one meta-RL training run."""

    description: ClassVar[str] = "RL train summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS

    experiment: str = Field(description="experiment name (params.yaml `rl_experiments` key)")
    algorithm: str = Field(description="meta-RL algorithm")
    env: str = Field(description="environment family")
    iterations: int = Field(description="meta-iterations done")
    training_seconds: float = Field(description="training time, seconds (from tasks/s)")
    tasks_per_s: float = Field(description="meta-training tasks per second")
    final_pre_adaptation_return: float = Field(
        description="mean return before adaptation, last iteration"
    )
    final_post_adaptation_return: float = Field(
        description="mean return after adaptation, last iteration"
    )
    peak_memory_mb: float = Field(description="peak memory (host RSS) of the stage, MB")
    gpu_peak_allocated_mb: GpuPeakAllocated = None
    gpu_peak_reserved_mb: GpuPeakReserved = None
    device: Device = None
    device_name: DeviceName = None
    threads: Threads = None
    torch_version: TorchVersion = None
    cuda_version: CudaVersion = None
    mlflow_run_id: str | None = Field(description="MLflow run of the stage; None if untracked")


BEFORE_ADAPTATION_KEY = "before_adaptation"
_AFTER_STEPS_KEY = re.compile(r"after_([1-9][0-9]*)_steps")


def adaptation_key(steps: int) -> str:
    """The file key of a return after `steps` adaptation steps: 0 -> 'before_adaptation',
    n -> 'after_n_steps' (also for n = 1, as the files always had it)."""
    return BEFORE_ADAPTATION_KEY if steps == 0 else f"after_{steps}_steps"


def adaptation_steps_of(key: str) -> int | None:
    """Inverse of `adaptation_key`; None for any other key."""
    if key == BEFORE_ADAPTATION_KEY:
        return 0
    match = _AFTER_STEPS_KEY.fullmatch(key)
    return int(match.group(1)) if match else None


class AdaptationReturn(_Schema):
    """Held-out return after some number of adaptation steps, over tasks."""

    mean_return: float = Field(description="mean over tasks of the per-task mean return")
    ci95: float = Field(description="95% half-width, 1.96 * std / sqrt(tasks)")
    std: float = Field(description="standard deviation over tasks (ddof=1; 0 for one task)")


class RLEvaluationMetrics(_Schema):
    """metrics/eval_rl/<name>.json: held-out return before and after any number of
    adaptation steps.

    In the file each step count is its own key (`adaptation_key`: 'before_adaptation',
    'after_1_steps', 'after_5_steps', ...) after the identity keys; here they are one
    mapping, `returns`, in file order.
    """

    description: ClassVar[str] = "RL evaluation summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS | {"peak_memory_mb"}

    experiment: str = Field(description="experiment name")
    algorithm: str = Field(description="meta-RL algorithm")
    env: str = Field(description="environment family")
    num_tasks: int = Field(description="held-out tasks evaluated")
    peak_memory_mb: OptionalFloat = Field(
        default=None, description="peak memory (host RSS) of the stage, MB; None if not recorded"
    )
    gpu_peak_allocated_mb: GpuPeakAllocated = None
    gpu_peak_reserved_mb: GpuPeakReserved = None
    device: Device = None
    device_name: DeviceName = None
    threads: Threads = None
    torch_version: TorchVersion = None
    cuda_version: CudaVersion = None
    returns: dict[int, AdaptationReturn] = Field(
        description="{adaptation steps: return}; 0 is before adaptation"
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_step_keys(cls, data: Any) -> Any:
        """File layout -> model: move the per-step keys into `returns` (file order)."""
        if not isinstance(data, dict) or "returns" in data:
            return data
        fields, returns = {}, {}
        for key, value in data.items():
            steps = adaptation_steps_of(key) if isinstance(key, str) else None
            if steps is None:
                fields[key] = value
            else:
                returns[steps] = value
        return {**fields, "returns": returns}

    @field_validator("returns")
    @classmethod
    def _steps_not_negative(
        cls, returns: dict[int, AdaptationReturn]
    ) -> dict[int, AdaptationReturn]:
        if not returns:
            raise ValueError("needs the return of at least one step count")
        negative = [steps for steps in returns if steps < 0]
        if negative:
            raise ValueError(f"adaptation steps must be >= 0, got {negative}")
        return returns

    @classmethod
    def error_location(cls, location: tuple) -> str:
        """('returns', 1, 'std') -> 'after_1_steps.std': the key the file has."""
        if len(location) > 1 and location[0] == "returns" and isinstance(location[1], int):
            location = (adaptation_key(location[1]), *location[2:])
        return super().error_location(location)

    @model_serializer(mode="wrap")
    def _spread_step_keys(self, handler: Any) -> dict[str, Any]:
        """Model -> file layout: `returns` becomes one key per step count."""
        data = handler(self)
        returns = data.pop("returns")
        return {**data, **{adaptation_key(steps): value for steps, value in returns.items()}}

    @property
    def adaptation_steps(self) -> list[int]:
        """The evaluated step counts, ascending (0 = before adaptation)."""
        return sorted(self.returns)


# ------------------------------------------------------------------------- lookup
SCHEMAS: dict[str, type[MetricsFile]] = {
    "data.json": DataMetrics,
    "prefetch.json": PrefetchMetrics,
    "episodes.json": EpisodesMetrics,
    "train/*.json": TrainSummary,
    "eval/*.json": EvaluationMetrics,
    "train_rl/*.json": RLTrainSummary,
    "eval_rl/*.json": RLEvaluationMetrics,
}
"""{pattern relative to metrics/: schema} of every JSON metrics file."""


def schema_for(relative_path: str | Path) -> type[MetricsFile] | None:
    """The schema of a file given by its path relative to metrics/ (None if unknown)."""
    path = Path(relative_path)
    for pattern, schema in SCHEMAS.items():
        if path.match(pattern) and len(path.parts) == len(Path(pattern).parts):
            return schema
    return None
