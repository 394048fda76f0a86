"""The vision track's records: metrics/train/<run>.json and metrics/eval/<run>.json, each
with its info file. <run> is the experiment's name for its own run and <name>-s<seed> for
an extra training seed (params.yaml `seed_runs`); `seed` says which."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from metalab.records.base import (
    DEVICE_FIELDS,
    CudaVersion,
    Device,
    DeviceName,
    GpuPeakAllocated,
    GpuPeakReserved,
    MetricsFile,
    OptionalFloat,
    Schema,
    Threads,
    TorchVersion,
)


class TrainSummary(Schema):
    """metrics/train/<name>.json: `metalab.training.Trainer.summary()` plus the stage's
    peak memory and MLflow run id."""

    description: ClassVar[str] = "train summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS | {"seed"}

    experiment: str = Field(description="experiment name (params.yaml `experiments` key)")
    seed: int | None = Field(
        default=None,
        description="training seed; None in files written before it was recorded (then "
        "the experiment's train.seed)",
    )
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
    """The one field of the train summary the evaluate stage needs (in
    metrics/train/<name>.info.json): the MLflow run of the training, to nest the evaluation
    run under it. Other keys are ignored, so an older or partial train summary still links
    the runs."""

    model_config = ConfigDict(extra="ignore")
    description: ClassVar[str] = "train summary"

    mlflow_run_id: str | None = Field(default=None, description="MLflow run of the training")


class StepSelectionResult(Schema):
    """How a gradient learner's test-time steps on one setting were chosen (numbers only:
    the metrics file). The chosen count is the setting's ``adaptation_steps``."""

    trained_setting: bool = Field(
        description="the learner's training setting: it kept its trained steps (none tried)"
    )
    episodes: int = Field(description="validation episodes each candidate was scored on")
    validation_accuracy: dict[str, float] = Field(
        description="{candidate steps: mean validation query accuracy}, in the order tried"
    )


class SettingResult(Schema):
    """Held-out accuracy of one learner on one setting's episode set (fractions; the 95%
    half-widths are 1.96 * s / sqrt(n), None for fewer than two episodes)."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset(
        {"step_selection", "step_selection_note"}
    )

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
        description="mean seconds of adaptation + prediction per episode (episodes adapted "
        "together in one batch share its time evenly)"
    )
    episode_set: str = Field(
        description="fingerprint of the episode set: equal fingerprints can be paired"
    )
    step_selection: StepSelectionResult | None = Field(
        default=None,
        description="evaluate.step_selection's choice of adaptation_steps; None (left out of "
        "the file) without one",
    )
    step_selection_note: str | None = Field(
        default=None, description="the choice in words, with the validation set's fingerprint"
    )


class EvaluationMetrics(Schema):
    """metrics/eval/<name>.json: `metalab.evaluation.LearnerEvaluation` summarised."""

    description: ClassVar[str] = "evaluation summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS | {"seed"}

    experiment: str = Field(description="experiment name")
    seed: int | None = Field(
        default=None, description="training seed of the evaluated model; None if not recorded"
    )
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

    def to_dict(self) -> dict[str, Any]:
        """As `MetricsFile.to_dict`, each setting also without its None step-selection
        fields: a record without a selection writes the files it always wrote."""
        data = super().to_dict()
        omitted = SettingResult.omitted_when_none
        data["settings"] = {
            setting: {k: v for k, v in result.items() if not (v is None and k in omitted)}
            for setting, result in data["settings"].items()
        }
        return data
