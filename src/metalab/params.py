"""params.yaml: every setting of every stage, validated on load.

Each section's schema lives beside the code that reads it and is only assembled here:

- ``data``, ``episodes``: `metalab.data.config`
- ``experiments.<name>.model``, ``pretrain``: `metalab.models.config`
- ``experiments.<name>.options``: the algorithm's ``Options`` (`metalab.algorithms`),
  typed once, at load: ``params.experiment(name).options`` is that ``Options`` instance
- ``rl_experiments.<name>``: `metalab.rl.config`
- ``tracking``, ``evaluate.step_selection``: `metalab.schema`

The sections that belong to the pipeline as a whole (the shared ``train`` defaults and an
experiment's overrides, ``evaluate`` with its optional ``step_selection``, ``report``,
``seed_runs``: extra training seeds) are defined here. Stages that read only a few
sections load just those (`metalab.data.config.load_data_params`,
`metalab.rl.config.load_rl_params`, `metalab.algorithms.pretrain.load_pretrain_params`).

Each top-level section belongs to one stage (DVC tracks them separately, so changing one
section reruns only the stages that read it). Unknown keys, wrong types and out-of-range
values raise `ParamsError` with a one-line message naming the dotted key, the bad value
and what is allowed; stages turn it into exit status 2. An experiment's ``train``
overrides keep the ranges of ``train``; what sections say about each other is checked at
load too (`Params._consistent`): ``evaluate.settings`` exist in ``episodes.settings``,
``report`` names configured experiments and an evaluated setting, and every experiment's
merged ``train`` draws at most ``OMNIGLOT_DRAWINGS_PER_CHARACTER`` (`metalab.data.config`)
images per class from no more classes than its split parts hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from metalab.algorithms.registry import ALGORITHMS, options_class, refuse_renamed
from metalab.data.config import (
    DataConfig,
    EpisodesConfig,
    check_episodes_fit,
    drawings_needed,
    parse_setting,
    split_classes,
)
from metalab.layout import PRETRAIN_DIR, RANDOM_BODY_INIT
from metalab.models.config import ModelConfig, PretrainConfig
from metalab.rl.config import RLExperimentConfig
from metalab.schema import (
    ExperimentName,
    ParamsError,
    StepSelectionConfig,
    Strict,
    TrackingConfig,
    field_error,
    named_entry,
    read_params_file,
    validate_model,
)

__all__ = [
    "EvaluateConfig",
    "ExperimentConfig",
    "Params",
    "TuningConfig",
    "ParamsError",
    "PretrainConfig",
    "ReportConfig",
    "SeedRunConfig",
    "StepSelectionConfig",
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

    @model_validator(mode="after")
    def _enough_drawings(self) -> TrainConfig:
        problem = drawings_needed(self.k_shot, self.query_per_class)
        if problem:
            raise field_error(("k_shot",), self.k_shot, problem)
        return self


def _optional(field: FieldInfo) -> tuple[Any, Any]:
    """`field`'s type with its constraints (ge, le, ...), or None; default None."""
    annotation = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return annotation | None, Field(None, description=field.description)


# Same keys, all optional and each with TrainConfig's constraints: an experiment overrides
# only what it names, within the ranges of ``train`` (checked where it is written).
TrainOverrides = create_model(
    "TrainOverrides",
    __config__=ConfigDict(extra="forbid"),
    **{name: _optional(field) for name, field in TrainConfig.model_fields.items()},
)


class ExperimentConfig(Strict):
    """``experiments.<name>``: one learner, its network, options and training overrides.

    ``options`` is the algorithm's validated ``Options`` instance after `validate_params`
    (a plain mapping only while the file is being read).
    """

    algorithm: str
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    body_init: str = Field(
        RANDOM_BODY_INIT,
        description=f"where the body's starting weights come from, as the path the train "
        f"stage depends on: {RANDOM_BODY_INIT} (random start), {PRETRAIN_DIR.as_posix()} (the "
        "body the pretrain stage trained on the meta-train classes) or a weights file; "
        "written out in every experiment of a params file, since dvc.yaml reads it",
    )
    options: Any = Field(default_factory=dict)
    train: TrainOverrides = Field(default_factory=TrainOverrides)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _no_retired_names(cls, data: Any) -> Any:
        """The seed's names of its designs: refused with the new one (`registry.renamed`)."""
        return refuse_renamed(data)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, algorithm: str) -> str:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm; allowed: {', '.join(sorted(ALGORITHMS))}")
        return algorithm

    @field_validator("body_init")
    @classmethod
    def _project_path(cls, body_init: str) -> str:
        path = Path(body_init)
        if not body_init.strip() or ".." in path.parts:
            raise ValueError("must be a path inside the project (no '..')")
        return path.as_posix()

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
    trained_setting_only: bool = Field(
        False,
        description="evaluate each model only on the settings of the N-way K-shot tasks it "
        "was trained on (one model per setting, as the papers train them); false = every "
        "evaluated setting",
    )
    step_selection: StepSelectionConfig | None = Field(
        None,
        description="choose test-time steps per setting on validation tasks; null = off "
        "(every setting uses adaptation_steps or the learner's default)",
    )


def _two_distinct(pair: list[str]) -> list[str]:
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError("a pair is two distinct experiment names")
    return pair


class ReportConfig(Strict):
    sort_by: str = Field(
        "5w1s",
        description="evaluated setting whose accuracy orders the table (if left out and 5w1s "
        "is not evaluated: the first evaluated setting)",
    )
    pairs: list[Annotated[list[str], AfterValidator(_two_distinct)]] = Field(
        default_factory=list, description="experiment pairs for the paired comparison table"
    )


# ----------------------------------------------------------------------------- tuning
#: A params path inside ``experiments.<name>``: ``options.inner_lr``, ``train.meta_lr``.
RatePath = Annotated[str, Field(pattern=r"^(options|train)\.[a-z_][a-z0-9_]*$")]


class TuningConfig(Strict):
    """``tuning``: the validation sweep of `metalab-tune` (read by no stage).

    Every experiment gets the same trials: its main learning rate(s) at the current value
    times each factor (several rates of one experiment move together), trained for the
    same fraction of its budget, selected on validation accuracy. Entries naming no
    experiment are ignored (a params file may trim the experiments, as the smoke run does);
    `metalab-tune` refuses to plan an experiment without one.
    """

    factors: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0],
        min_length=2,
        description="multiples of the current learning rate(s) tried, one trial each",
    )
    budget_fraction: float = Field(
        0.34, gt=0, le=1, description="fraction of each experiment's iterations per trial"
    )
    rates: dict[ExperimentName, list[RatePath]] = Field(
        default_factory=dict,
        description="per experiment, its main learning rate(s) as paths inside "
        "experiments.<name> (options.<key> or train.<key>)",
    )
    follows: dict[ExperimentName, ExperimentName] = Field(
        default_factory=dict,
        description="experiments that take another's chosen rate(s) instead of a sweep of "
        "their own (a precision check must differ from its reference in precision only)",
    )


# ---------------------------------------------------------------------- seed runs
def run_name(experiment: str, seed: int | None) -> str:
    """What a training run's files are called: the experiment's own run ``<experiment>``
    (seed None), an extra training seed ``<experiment>-s<seed>`` (as the RL runs)."""
    return experiment if seed is None else f"{experiment}-s{seed}"


class SeedRunConfig(Strict):
    """``seed_runs.<experiment>-s<seed>``: one more training run of an experiment, with
    the experiment's settings and ``train.seed`` = `seed` (stages train_seed@<key> and
    evaluate_seed@<key>; files <experiment>-s<seed>)."""

    experiment: ExperimentName
    seed: int = Field(ge=0, description="training seed, other than the experiment's own")
    body_init: str = Field(
        description="the experiment's body_init, repeated: dvc.yaml makes it the stage's "
        "dependency and cannot look it up in the experiment's entry"
    )


class Params(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    episodes: EpisodesConfig = Field(default_factory=EpisodesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    experiments: dict[ExperimentName, ExperimentConfig] = Field(default_factory=dict)
    rl_experiments: dict[ExperimentName, RLExperimentConfig] = Field(default_factory=dict)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    seed_runs: dict[ExperimentName, SeedRunConfig] = Field(
        default_factory=dict,
        description="extra training seeds, one entry (<experiment>-s<seed>) per run",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        """What the sections say about each other (each key's own range is checked by its
        field); raises a pydantic error naming one key, in the order of params.yaml."""
        check_episodes_fit(self.data, self.episodes)
        classes = split_classes(self.data)
        self._check_train(self.train, ("train",), set(TrainConfig.model_fields), classes)
        for name, experiment in self.experiments.items():
            overridden = set(experiment.train.model_dump(exclude_none=True))
            where = ("experiments", name, "train")
            self._check_train(self.train_config(name), where, overridden, classes)
        settings = self.evaluate.settings
        if settings is not None:
            missing = [s for s in settings if s not in self.episodes.settings]
            if missing:
                raise field_error(
                    ("evaluate", "settings"),
                    settings,
                    f"{', '.join(missing)} not in episodes.settings "
                    f"[{', '.join(self.episodes.settings)}] (only those episode sets exist)",
                )
        self._check_step_selection(classes)
        for index, pair in enumerate(self.report.pairs):
            unknown = [name for name in pair if name not in self.experiments]
            if unknown:
                known = ", ".join(sorted(self.experiments)) or "none"
                raise field_error(
                    ("report", "pairs", index),
                    pair,
                    f"no experiment named {', '.join(unknown)}; known: {known}",
                )
        for key, run in self.seed_runs.items():
            self._check_seed_run(key, run)
        evaluated = self.evaluation_settings()
        if self.report.sort_by not in evaluated:
            if "sort_by" in self.report.model_fields_set:
                raise field_error(
                    ("report", "sort_by"),
                    self.report.sort_by,
                    f"not an evaluated setting; evaluated: {', '.join(evaluated)}",
                )
            self.report.sort_by = evaluated[0]  # the default names a setting not evaluated
        return self

    @staticmethod
    def _check_train(
        config: TrainConfig,
        where: tuple[str, ...],
        overridden: set[str],
        classes: dict[str, int] | None,
    ) -> None:
        """`config` (``train`` merged with the overrides `overridden` written at `where`)
        asks for tasks the data can give: K + Q drawings per class, N classes per split part
        (the train loop samples meta-train and validation tasks N-way)."""

        def at(*keys: str) -> tuple[str, ...]:
            """Where the first of `keys` the experiment sets is written, else ``train``'s."""
            key = next((key for key in keys if key in overridden), None)
            return (*where, key) if key else ("train", keys[0])

        problem = drawings_needed(config.k_shot, config.query_per_class)
        if problem:
            location = at("k_shot", "query_per_class")
            raise field_error(location, getattr(config, location[-1]), problem)
        if classes is not None:
            for part in ("meta_train", "validation"):
                if config.n_way > classes[part]:
                    raise field_error(
                        at("n_way"),
                        config.n_way,
                        f"{config.n_way}-way tasks need {config.n_way} classes; the {part} "
                        f"split has {classes[part]} (data.split, data.expected)",
                    )

    def _check_step_selection(self, classes: dict[str, int] | None) -> None:
        """A step selection replaces fixed test steps and draws every evaluated setting's
        tasks from the validation classes, so it needs that many classes."""
        selection = self.evaluate.step_selection
        if selection is None:
            return
        if self.evaluate.adaptation_steps is not None:
            raise field_error(
                ("evaluate", "adaptation_steps"),
                self.evaluate.adaptation_steps,
                "fixed steps for every setting, but evaluate.step_selection chooses them "
                "per setting: set one of the two to null",
            )
        if classes is None:
            return
        for setting in self.evaluation_settings():
            n_way, _ = parse_setting(setting)
            if n_way > classes["validation"]:
                raise field_error(
                    ("evaluate", "step_selection"),
                    selection.model_dump(),
                    f"{setting} validation tasks need {n_way} classes; the validation split "
                    f"has {classes['validation']} (data.split)",
                )

    def _check_seed_run(self, key: str, run: SeedRunConfig) -> None:
        """A seed run names a configured experiment, is keyed by its files' name and
        trains with a seed the experiment's own run does not use."""
        where = ("seed_runs", key)
        if run.experiment not in self.experiments:
            known = ", ".join(sorted(self.experiments)) or "none"
            raise field_error(
                (*where, "experiment"), run.experiment, f"no such experiment; known: {known}"
            )
        expected = run_name(run.experiment, run.seed)
        if key != expected:
            raise field_error(where, key, f"a seed run is keyed <experiment>-s<seed>: {expected}")
        if key in self.experiments:
            raise field_error(where, key, "also an experiment's name (their files would clash)")
        body_init = self.experiments[run.experiment].body_init
        if Path(run.body_init).as_posix() != body_init:
            raise field_error(
                (*where, "body_init"), run.body_init, f"must be {run.experiment}'s: {body_init}"
            )
        own = self.train_config(run.experiment).seed
        if run.seed == own:
            raise field_error(
                (*where, "seed"),
                run.seed,
                f"the seed of {run.experiment}'s own run (train.seed); list other seeds",
            )

    def experiment(self, name: str) -> ExperimentConfig:
        return named_entry(self.experiments, name, "experiment")

    def seeded(self, name: str, seed: int | None) -> tuple[str, Params]:
        """(run name, params) of experiment `name` trained with `seed` (None: as
        configured): the params hold the run as an experiment of its own whose
        ``train.seed`` is `seed`, so the train loop, its checkpoint and its model file
        take the run's name. A seed equal to the experiment's own is refused (that run
        is the experiment's own, under its name)."""
        experiment = self.experiment(name)
        if seed is None:
            return name, self
        own = self.train_config(name).seed
        if seed == own:
            raise ParamsError(
                f"--seed {seed}: experiments.{name} already trains with seed {own} "
                "(its own run); omit --seed for it"
            )
        train = experiment.train.model_copy(update={"seed": seed})
        run = run_name(name, seed)
        experiments = {**self.experiments, run: experiment.model_copy(update={"train": train})}
        return run, self.model_copy(update={"experiments": experiments})

    def evaluation_settings(self) -> list[str]:
        """`evaluate.settings`, or all of `episodes.settings` when null (that every listed
        setting has an episode set is checked at load)."""
        settings = self.evaluate.settings
        return list(self.episodes.settings if settings is None else settings)

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
    classes = split_classes(params.data)
    for name, experiment in params.experiments.items():
        schema = options_class(experiment.algorithm)
        options = experiment.options
        if not isinstance(options, schema):
            raw_options = options if isinstance(options, dict) else options.model_dump()
            experiment.options = validate_model(
                schema, raw_options, prefix=("experiments", name, "options")
            )
        train_n_way = getattr(experiment.options, "train_n_way", None)
        if classes is not None and train_n_way is not None and train_n_way > classes["meta_train"]:
            raise ParamsError(
                f"params.yaml: experiments.{name}.options.train_n_way = {train_n_way}: "
                f"{train_n_way}-way tasks need {train_n_way} classes; the meta_train split has "
                f"{classes['meta_train']} (data.split, data.expected)"
            )
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises `ParamsError` with a one-line message.

    In a file every experiment writes out ``body_init``: dvc.yaml makes it the train stage's
    dependency, and DVC cannot fall back to the schema's default."""
    raw = read_params_file(path)
    experiments = raw.get("experiments") if isinstance(raw, dict) else None
    for name, experiment in (experiments or {}).items():
        if isinstance(experiment, dict) and "body_init" not in experiment:
            raise ParamsError(
                f"{path}: experiments.{name}.body_init: missing; every experiment names its "
                f"starting body ({RANDOM_BODY_INIT} for a random start, "
                f"{PRETRAIN_DIR.as_posix()} for the pretrained body, or a weights file), "
                "since dvc.yaml makes it the train stage's dependency"
            )
    return validate_params(raw)
