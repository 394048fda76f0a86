"""The meta-RL track's records: metrics/train_rl/<run>.json and metrics/eval_rl/<run>.json,
each with its info file; <run> is one training seed of an experiment, <name>-s<seed>
(files written before seeds were per stage are named <name> and have no `seed`)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_serializer, model_validator

from metalab.records.base import (
    DEVICE_FIELDS,
    CudaVersion,
    Device,
    DeviceName,
    GpuPeakAllocated,
    GpuPeakReserved,
    OptionalFloat,
    Schema,
    Threads,
    TorchVersion,
)


class RLTrainSummary(Schema):
    """metrics/train_rl/<name>.json: one meta-RL training run."""

    description: ClassVar[str] = "RL train summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS | {"seed"}

    experiment: str = Field(description="experiment name (params.yaml `rl_experiments` key)")
    seed: int | None = Field(default=None, description="training seed; None if not recorded")
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
META_LEARNED = "meta_learned"  # the `policy` of a learner's own rows in the report
REFERENCE_PREFIX = "reference_"
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


def _gather_steps(value: Any) -> Any:
    """A reference's per-step keys ('before_adaptation', 'after_1_steps') -> step counts;
    anything else is left for validation to reject."""
    if not isinstance(value, dict):
        return value
    return {
        (steps if (steps := adaptation_steps_of(key)) is not None else key): item
        for key, item in value.items()
    }


class AdaptationReturn(Schema):
    """Held-out return after some number of adaptation steps, over tasks."""

    mean_return: float = Field(description="mean over tasks of the per-task mean return")
    ci95: float = Field(description="95% half-width, 1.96 * std / sqrt(tasks)")
    std: float = Field(description="standard deviation over tasks (ddof=1; 0 for one task)")


class RLEvaluationMetrics(Schema):
    """metrics/eval_rl/<name>.json: held-out return before and after any number of
    adaptation steps.

    In the metrics file each step count is its own key (`adaptation_key`:
    'before_adaptation', 'after_1_steps', 'after_5_steps', ...) after the other numbers;
    here they are one mapping, `returns`, in file order.
    """

    description: ClassVar[str] = "RL evaluation summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS | {
        "peak_memory_mb",
        "trained_steps",
        "trajectories_per_task",
        "eval_step_schedule",
        "seed",
    }

    experiment: str = Field(description="experiment name")
    seed: int | None = Field(
        default=None, description="training seed of the evaluated policy; None if not recorded"
    )
    algorithm: str = Field(description="meta-RL algorithm")
    env: str = Field(description="environment family")
    num_tasks: int = Field(description="held-out tasks evaluated")
    trained_steps: int | None = Field(
        default=None,
        description="inner steps per task during meta-training; returns after more steps "
        "are beyond what the learner was trained for",
    )
    trajectories_per_task: int | None = Field(
        default=None, description="trajectories per task and adaptation step"
    )
    eval_step_schedule: str | None = Field(
        default=None, description="adaptation step sizes: 'halve_after_first' or 'constant'"
    )
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
    references: dict[str, dict[int, AdaptationReturn]] = Field(
        default_factory=dict,
        description="reference policies on the same tasks, {name: {adaptation steps: "
        "return}}: 'random_init' (the untrained initialisation, adapted the same way), "
        "'oracle' (the environment's task-aware policy, no adaptation); in the file each "
        "is a key 'reference_<name>' holding per-step keys like the learner's",
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_step_keys(cls, data: Any) -> Any:
        """File layout -> model: move the per-step keys into `returns` and the reference
        keys into `references` (file order)."""
        if not isinstance(data, dict) or "returns" in data:
            return data
        fields, returns, references = {}, {}, {}
        for key, value in data.items():
            steps = adaptation_steps_of(key) if isinstance(key, str) else None
            if steps is not None:
                returns[steps] = value
            elif isinstance(key, str) and key.startswith(REFERENCE_PREFIX):
                references[key.removeprefix(REFERENCE_PREFIX)] = _gather_steps(value)
            else:
                fields[key] = value
        return {**fields, "returns": returns, "references": references}

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
    def file_location(cls, location: tuple) -> tuple:
        """('returns', 1, 'std') -> ('after_1_steps', 'std'): the keys the file has."""
        if len(location) > 1 and location[0] == "returns" and isinstance(location[1], int):
            return (adaptation_key(location[1]), *location[2:])
        if len(location) > 1 and location[0] == "references":
            rest = location[2:]
            if rest and isinstance(rest[0], int):
                rest = (adaptation_key(rest[0]), *rest[1:])
            return (f"{REFERENCE_PREFIX}{location[1]}", *rest)
        return location

    @classmethod
    def file_key_annotation(cls, key: str) -> Any | None:
        """A per-step key ('after_1_steps') holds an `AdaptationReturn`."""
        if adaptation_steps_of(key) is not None:
            return AdaptationReturn
        if key.startswith(REFERENCE_PREFIX):
            return dict[str, AdaptationReturn]
        return super().file_key_annotation(key)

    @model_serializer(mode="wrap")
    def _spread_step_keys(self, handler: Any) -> dict[str, Any]:
        """Model -> file layout: `returns` becomes one key per step count."""
        data = handler(self)
        returns = data.pop("returns")
        references = data.pop("references")
        return {
            **data,
            **{adaptation_key(steps): value for steps, value in returns.items()},
            **{
                f"{REFERENCE_PREFIX}{name}": {
                    adaptation_key(steps): value for steps, value in reference.items()
                }
                for name, reference in references.items()
            },
        }

    @property
    def adaptation_steps(self) -> list[int]:
        """The evaluated step counts, ascending (0 = before adaptation)."""
        return sorted(self.returns)
