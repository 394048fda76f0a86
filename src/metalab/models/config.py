"""``experiments.<name>.model`` in params.yaml: which network a learner builds (no torch here,
so validating params.yaml does not load the networks)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """``experiments.<name>.model`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["conv4", "resnet18"] = "conv4"
    hidden: int = Field(64, ge=1, le=1024, description="Conv4 channels per block")
    downsample: Literal["maxpool", "stride"] = Field(
        "maxpool", description="Conv4: MaxPool2 after each block, or stride-2 convs (MAML's net)"
    )


class PretrainConfig(BaseModel):
    """``pretrain``: supervised pretraining of a body on the meta-train classes (ANIL
    S3-S5)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="resnet18"))
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.001, gt=0)
    seed: int = Field(0, ge=0)
    drawings_per_class: int | None = Field(
        None,
        ge=1,
        le=20,
        description="train on the first N drawings of each meta-train class (null = all "
        "that are not held out)",
    )
    validation_drawings: int = Field(
        2,
        ge=0,
        le=19,
        description="the last N drawings of each meta-train character, held out to measure "
        "the validation curve (0 = none)",
    )
    evaluations_per_epoch: int = Field(
        4, ge=1, le=100, description="rows of the validation curve per epoch"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward passes under bf16 autocast (pays off with AMX)"
    )
    channels_last: bool = Field(
        False, description="channels-last memory format for the weights and inputs"
    )
    threads: int = Field(
        2,
        ge=1,
        le=256,
        description="CPU threads (a param, not METALAB_THREADS: the body's bits depend on it)",
    )
