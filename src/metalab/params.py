"""params.yaml: every setting of every stage, validated on load.

Each section's schema lives beside the code that reads it and is only assembled here:

- ``data``, ``episodes``: `metalab.data.config`
- ``experiments.<name>.model``, ``pretrain``: `metalab.models.config`
- ``experiments.<name>.options``: the algorithm's ``Options`` (`metalab.algorithms`),
  typed once, at load: ``params.experiment(name).options`` is that ``Options`` instance
- ``rl_experiments.<name>``: `metalab.rl.config`
- ``tracking``: `metalab.schema`

The sections that belong to the pipeline as a whole (the shared ``train`` defaults and an
experiment's overrides, ``evaluate``, ``report``) are defined here. Stages that read only a
few sections load just those (`metalab.data.config.load_data_params`,
`metalab.rl.config.load_rl_params`, `metalab.algorithms.pretrain.load_pretrain_params`).

Each top-level section belongs to one stage (DVC tracks them separately, so changing one
section reruns only the stages that read it). Unknown keys, wrong types and out-of-range
values raise `ParamsError` with a one-line message naming the dotted key, the bad value
and what is allowed; stages turn it into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from metalab.algorithms.registry import ALGORITHMS, options_class
from metalab.data.config import DataConfig, EpisodesConfig
from metalab.models.config import ModelConfig, PretrainConfig
from metalab.rl.config import RLExperimentConfig
from metalab.schema import (
    ParamsError,
    Strict,
    TrackingConfig,
    named_entry,
    read_params_file,
    validate_model,
)

__all__ = [
    "EvaluateConfig",
    "ExperimentConfig",
    "Params",
    "ParamsError",
    "PretrainConfig",
    "ReportConfig",
    "TrainConfig",
    "load_params",
    "validate_params",
]


# ---------------------------------------------------------------------------- train
class TrainConfig(Strict):
    """``train``: the meta-training loop's settings, shared by every experiment."""

    n_way: int = Field(5, ge=2, le=200)
    k_shot: int = Field(1, ge=1, le=100)
    query_per_class: int = Field(15, ge=1, le=100)
    meta_batch_size: int = Field(32, ge=1, le=4096)
    iterations: int = Field(1000, ge=1)
    meta_lr: float = Field(0.001, gt=0, le=10)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine: final lr / meta_lr")
    optimizer: Literal["adam", "sgd"] = "adam"
    grad_clip_norm: float | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int = Field(2, ge=1, le=256)
    seed: int = Field(0, ge=0)
    validate_every: int = Field(100, ge=1)
    validation_episodes: int = Field(100, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)


# Same keys, all optional: an experiment overrides only what it names.
TrainOverrides = create_model(
    "TrainOverrides",
    __config__=ConfigDict(extra="forbid"),
    **{
        name: (field.annotation | None, Field(None, description=field.description))
        for name, field in TrainConfig.model_fields.items()
    },
)


class PretrainedConfig(Strict):
    source: Literal["none", "background", "torchvision", "file"] = Field(
        "none", description="where the body's starting weights come from"
    )
    path: str | None = Field(None, description="state-dict file for source 'file'")


class ExperimentConfig(Strict):
    """``experiments.<name>``: one learner, its network, options and training overrides.

    ``options`` is the algorithm's validated ``Options`` instance after `validate_params`
    (a plain mapping only while the file is being read).
    """

    algorithm: str
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrained: PretrainedConfig = Field(default_factory=PretrainedConfig)
    options: Any = Field(default_factory=dict)
    train: TrainOverrides = Field(default_factory=TrainOverrides)  # type: ignore[valid-type]

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, algorithm: str) -> str:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm; allowed: {', '.join(sorted(ALGORITHMS))}")
        return algorithm

    @field_validator("options")
    @classmethod
    def _mapping(cls, options: Any) -> Any:
        if not isinstance(options, dict | BaseModel):
            raise ValueError("must be a mapping of the algorithm's options")
        return options


# ------------------------------------------------------------------ evaluate / report
class EvaluateConfig(Strict):
    settings: list[str] | None = Field(
        None, description="subset of episodes.settings to evaluate; null = all"
    )
    adaptation_steps: int | None = Field(
        None, ge=0, description="test-time adaptation steps; null = each learner's default"
    )
    max_episodes: int | None = Field(
        None,
        ge=2,
        description="evaluate the first N tasks of each stored episode set (every learner "
        "gets the same N, so comparisons stay paired); null = all of them",
    )


class ReportConfig(Strict):
    sort_by: str = Field("5w1s", description="setting whose accuracy orders the table")
    pairs: list[list[str]] = Field(
        default_factory=list, description="experiment pairs for the paired comparison table"
    )


class Params(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    episodes: EpisodesConfig = Field(default_factory=EpisodesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    experiments: dict[str, ExperimentConfig] = Field(default_factory=dict)
    rl_experiments: dict[str, RLExperimentConfig] = Field(default_factory=dict)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def experiment(self, name: str) -> ExperimentConfig:
        return named_entry(self.experiments, name, "experiment")

    def evaluation_settings(self) -> list[str]:
        """`evaluate.settings`, or all of `episodes.settings` when null; ParamsError if a
        listed setting has no episode set."""
        settings = self.evaluate.settings
        if settings is None:
            return list(self.episodes.settings)
        missing = [s for s in settings if s not in self.episodes.settings]
        if missing:
            raise ParamsError(
                f"params.yaml: evaluate.settings = {missing}: not in episodes.settings "
                f"{self.episodes.settings} (only those episode sets exist)"
            )
        return list(settings)

    def train_config(self, name: str) -> TrainConfig:
        """The `train` defaults with experiment `name`'s overrides applied."""
        overrides = self.experiment(name).train.model_dump(exclude_none=True)
        return self.train.model_copy(update=overrides)


def validate_params(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping; each experiment's ``options`` becomes its
    algorithm's typed ``Options`` here, once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of sections")
    params = validate_model(Params, raw)
    for name, experiment in params.experiments.items():
        schema = options_class(experiment.algorithm)
        options = experiment.options
        if not isinstance(options, schema):
            raw_options = options if isinstance(options, dict) else options.model_dump()
            experiment.options = validate_model(
                schema, raw_options, prefix=("experiments", name, "options")
            )
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises `ParamsError` with a one-line message."""
    return validate_params(read_params_file(path))
