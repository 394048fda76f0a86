"""The pretrain stage's record: metrics/pretrain.json (numbers) and metrics/pretrain.info.json
(the network, precision, device and run id)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

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


class PretrainMetrics(Schema):
    """metrics/pretrain.json: what the body trained on, how far it got on the held-out
    drawings (the validation curve itself is plots/pretrain.csv), and what it cost."""

    description: ClassVar[str] = "pretrain summary"
    omitted_when_none: ClassVar[frozenset[str]] = DEVICE_FIELDS

    model: str = Field(description="the network pretrained (pretrain.model.name)")
    epochs: int = Field(description="epochs trained")
    steps: int = Field(description="optimizer steps")
    characters: int = Field(description="meta-train characters (the classes)")
    training_images: int = Field(description="training drawings (seen once per epoch)")
    validation_images: int = Field(description="held-out drawings of the same characters")
    final_loss: float = Field(description="training loss over the last curve interval")
    final_accuracy: float = Field(description="training accuracy over the last curve interval")
    final_validation_loss: OptionalFloat = Field(
        description="loss on the held-out drawings at the end; None without them"
    )
    final_validation_accuracy: OptionalFloat = Field(
        description="accuracy on the held-out drawings at the end; None without them"
    )
    best_validation_accuracy: OptionalFloat = Field(
        description="best accuracy on the held-out drawings at any curve point"
    )
    best_validation_epoch: OptionalFloat = Field(
        description="the (fractional) epoch of the best held-out accuracy"
    )
    validation_accuracy_by_epoch: dict[str, OptionalFloat] = Field(
        description="{epoch (1, 2, ...): held-out accuracy at its end}"
    )
    training_seconds: float = Field(
        description="wall time of the training loop, its validation passes included, s"
    )
    images_per_s: float = Field(description="training images per second of the loop")
    channels_last: bool = Field(description="trained in channels-last memory format")
    precision: str = Field(description="fp32, or bf16 (autocast forward passes)")
    peak_memory_mb: float = Field(description="peak memory (host RSS) of the stage, MB")
    gpu_peak_allocated_mb: GpuPeakAllocated = None
    gpu_peak_reserved_mb: GpuPeakReserved = None
    device: Device = None
    device_name: DeviceName = None
    threads: Threads = None
    torch_version: TorchVersion = None
    cuda_version: CudaVersion = None
    mlflow_run_id: str | None = Field(description="MLflow run of the stage; None if untracked")
