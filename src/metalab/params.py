"""The params.yaml schema: every setting of every stage, validated on load.

Each top-level section belongs to one stage (DVC tracks them separately, so changing one
section reruns only the stages that read it). Unknown keys, wrong types and out-of-range
values raise `ParamsError` with a one-line message naming the dotted key, the bad value
and what is allowed; stages turn it into exit status 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from metalab.models.factory import ModelConfig
from metalab.rl.config import RLExperimentConfig

OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
SETTING_PATTERN = re.compile(r"^(\d+)w(\d+)s$")


class ParamsError(ValueError):
    """A params.yaml problem, phrased as one line for the user."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------- data
class ArchiveCounts(Strict):
    alphabets: int = Field(ge=1)
    characters: int = Field(ge=1)
    drawings: int = Field(ge=1, description="PNG files in the archive")


class SplitConfig(Strict):
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
    sources: list[str] = Field(
        default_factory=lambda: ["../shared/data/omniglot", OFFICIAL_URL],
        min_length=1,
        description="tried in order: local mirror directories or http(s) base URLs",
    )
    download_timeout: float = Field(10.0, gt=0, le=600, description="seconds per request")
    expected: dict[Literal["images_background", "images_evaluation"], ArchiveCounts] = Field(
        default_factory=lambda: {
            "images_background": ArchiveCounts(alphabets=30, characters=964, drawings=19280),
            "images_evaluation": ArchiveCounts(alphabets=20, characters=659, drawings=13180),
        }
    )
    image_size: Literal[28, 105] = 28
    prefetch_workers: int = Field(2, ge=1, le=64)
    split: SplitConfig = Field(default_factory=SplitConfig)


# ------------------------------------------------------------------------- episodes
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


# ---------------------------------------------------------------------------- train
class TrainConfig(Strict):
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
    algorithm: str
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrained: PretrainedConfig = Field(default_factory=PretrainedConfig)
    options: dict[str, Any] = Field(default_factory=dict)
    train: TrainOverrides = Field(default_factory=TrainOverrides)  # type: ignore[valid-type]

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, algorithm: str) -> str:
        from metalab.algorithms.registry import ALGORITHMS

        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm; allowed: {', '.join(sorted(ALGORITHMS))}")
        return algorithm


class PretrainConfig(Strict):
    """Supervised pretraining of a body on the meta-train classes (ANIL S3-S5)."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="resnet18"))
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.001, gt=0)
    seed: int = Field(0, ge=0)


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


class TrackingConfig(Strict):
    experiment_name: str = Field("metalab", min_length=1)
    enabled: bool = True


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
        if name not in self.experiments:
            known = ", ".join(sorted(self.experiments)) or "none"
            raise ParamsError(f"params.yaml: no experiment named {name!r}; known: {known}")
        return self.experiments[name]

    def rl_experiment(self, name: str) -> RLExperimentConfig:
        if name not in self.rl_experiments:
            known = ", ".join(sorted(self.rl_experiments)) or "none"
            raise ParamsError(f"params.yaml: no RL experiment named {name!r}; known: {known}")
        return self.rl_experiments[name]

    def train_config(self, name: str) -> TrainConfig:
        """The `train` defaults with experiment `name`'s overrides applied."""
        overrides = self.experiment(name).train.model_dump(exclude_none=True)
        return self.train.model_copy(update=overrides)

    def algorithm_options(self, name: str) -> BaseModel:
        """Experiment `name`'s `options`, validated by its algorithm's `Options` schema."""
        from metalab.algorithms.registry import options_class

        experiment = self.experiment(name)
        schema = options_class(experiment.algorithm)
        try:
            return schema.model_validate(experiment.options)
        except ValidationError as error:
            raise ParamsError(
                format_validation_error(error, schema, prefix=("experiments", name, "options"))
            ) from None


# --------------------------------------------------------------------------- errors
def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation leads to (through Optional, dict and list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(root: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `path` inside `root` (for 'unknown key' messages)."""
    model: type[BaseModel] | None = root
    for part in path:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        if field is not None:  # otherwise a dict key or list index: same model continues
            model = _submodel(field.annotation)
    return sorted(model.model_fields) if model is not None else []


def format_validation_error(
    error: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()
) -> str:
    """One line: 'params.yaml: <dotted.key> = <value>: <what is allowed>' (first problem).

    `root` is the model that was validated (to list allowed keys); `prefix` is where it
    sits in params.yaml.
    """
    problems = error.errors()
    first = problems[0]
    # pydantic marks a bad dict key with a '[key]' entry: the key itself names it.
    location = tuple(part for part in first["loc"] if part != "[key]")
    dotted = ".".join(str(part) for part in prefix + location) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, location[:-1])
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        message = f"params.yaml: unknown key {dotted}{hint}"
    elif first["type"] == "missing":
        message = f"params.yaml: {dotted} is required"
    else:
        shown = yaml.safe_dump(first.get("input"), default_flow_style=True, width=10_000)
        shown = shown.strip().removesuffix("...").strip()
        reason = first["msg"].removeprefix("Value error, ")
        message = f"params.yaml: {dotted} = {shown}: {reason}"
    more = len(problems) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return message


def validate_params(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping, including each experiment's options."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of sections")
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, Params)) from None
    for name in params.experiments:
        params.algorithm_options(name)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises `ParamsError` with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run from the project root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}:{where} is not valid YAML: {error}".replace("\n", " ")) from None
    return validate_params(raw)
