"""What every params.yaml schema shares: strict models, one-line errors, the YAML reader.

Each section's schema lives beside the code that reads it (`metalab.data.config`,
`metalab.rl.config`, each algorithm's ``Options``); `metalab.params` assembles them. This
module is the bottom of that stack: pydantic and YAML only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ParamsError(ValueError):
    """A params.yaml problem, phrased as one line for the user (stages exit with 2)."""


class Strict(BaseModel):
    """A params.yaml section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# Experiment names become file names (models/<name>.pt, metrics/...) and DVC stage names
# (train@<name>): a letter, then letters, digits, '_' or '-'; no dots, slashes or spaces.
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _safe_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"names must match {NAME_PATTERN.pattern} (a letter, then at most 63 letters, "
            "digits, '_' or '-'): they become file and DVC stage names"
        )
    return name


ExperimentName = Annotated[str, AfterValidator(_safe_name)]
"""A key of ``experiments`` or ``rl_experiments`` (see `NAME_PATTERN`)."""

# The error type of `field_error`: a model validator's problem located at one of its keys.
FIELD_ERROR = "params_field"


def field_error(at: tuple[str | int, ...], value: Any, reason: str) -> PydanticCustomError:
    """What a model validator raises when a check across keys fails: the one-line message
    names the key `at` (relative to the validated model) and its `value`, as a field's own
    error would, rather than the whole section."""
    return PydanticCustomError(
        FIELD_ERROR, "{reason}", {"reason": reason, "at": at, "value": value}
    )


class Sections(BaseModel):
    """The params.yaml sections one stage reads (others are left to their stages): a stage
    that reads few sections validates only those, without importing the code of the rest."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class TrackingConfig(Strict):
    """``tracking``: where every stage records its MLflow run."""

    experiment_name: str = Field("metalab", min_length=1)
    enabled: bool = True


def _distinct_steps(steps: list[int]) -> list[int]:
    if len(set(steps)) != len(steps):
        raise ValueError("list each step count once")
    return steps


class StepSelectionConfig(Strict):
    """``evaluate.step_selection``: a gradient learner's test-time steps per setting.

    On a setting other than its training one (N-way K-shot), the learner uses the count of
    `steps` (and of its own test-time steps, always tried) with the best mean validation
    accuracy (ties: the fewest steps) over `episodes` tasks of that setting drawn from the
    validation classes (``data.split``; seeded by `seed` and the setting); on its training
    setting it keeps its trained steps. Learners without test-time gradient steps are
    unaffected. Read by the evaluate stage (`metalab.params.EvaluateConfig`).
    """

    # No defaults: this module is params machinery, not a stage dependency, so every
    # value that decides a number is spelled out in params.yaml (a DVC param).
    steps: Annotated[list[Annotated[int, Field(ge=0, le=200)]], AfterValidator(_distinct_steps)] = (
        Field(min_length=1, description="candidate test-time step counts, e.g. [1, 2, 3, 5, 10]")
    )
    episodes: int = Field(ge=2, le=10_000, description="validation tasks per candidate")
    seed: int = Field(ge=0, description="seed of the validation tasks and of adaptation")


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
    shown_input = first.get("input")
    if first["type"] == FIELD_ERROR:  # a cross-key check: its key and value, not the section's
        location += tuple(first["ctx"]["at"])
        shown_input = first["ctx"]["value"]
    dotted = ".".join(str(part) for part in prefix + location) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, location[:-1])
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        message = f"params.yaml: unknown key {dotted}{hint}"
    elif first["type"] == "missing":
        message = f"params.yaml: {dotted} is required"
    else:
        shown = yaml.safe_dump(shown_input, default_flow_style=True, width=10_000)
        shown = shown.strip().removesuffix("...").strip()
        reason = first["msg"].removeprefix("Value error, ")
        message = f"params.yaml: {dotted} = {shown}: {reason}"
    more = len(problems) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return message


def validate_model(schema: type[BaseModel], raw: Any, prefix: tuple[Any, ...] = ()) -> Any:
    """``schema.model_validate(raw)``, or `ParamsError` with the one-line message."""
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, schema, prefix)) from None


ANCHOR_PREFIX = "x-"


def read_params_file(path: str | Path) -> dict[str, Any]:
    """params.yaml parsed as a mapping of sections; `ParamsError` for a missing or bad file."""
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
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of sections")
    # Keys starting with "x-" only hold YAML anchors for the sections (as in Compose files).
    return {key: value for key, value in raw.items() if not str(key).startswith(ANCHOR_PREFIX)}


def load_sections(path: str | Path, schema: type[M]) -> M:
    """Read params.yaml and validate the sections `schema` declares; `ParamsError` (one line)."""
    return validate_model(schema, read_params_file(path))


def named_entry(entries: Mapping[str, T], name: str, kind: str) -> T:
    """``entries[name]``, or `ParamsError` naming the `kind` of entry and the known names."""
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise ParamsError(f"params.yaml: no {kind} named {name!r}; known: {known}")
    return entries[name]
