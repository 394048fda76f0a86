"""What every metrics schema shares: the split of a record between its metrics file (numbers
only, a DVC metric) and its info file (the text beside it), reading and writing the pair,
one-line errors, and the fields several schemas have.

Where a field goes follows from its declared type alone (`part_of`): int, float and bool
(None allowed) are numbers, str is text, a mapping or model takes the part of its values,
and a model holding both is split key by key. A type that is neither (``Any``, a list,
``int | str``) is a TypeError when its schema class is defined, so no text can reach a
metrics file.
"""

from __future__ import annotations

import enum
import json
import math
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
)

from metalab.io import write_text

INFO_SUFFIX = ".info.json"
"""A metrics file ``<name>.json`` keeps its non-numeric fields in ``<name>.info.json``."""


class MetricsFileError(ValueError):
    """A metrics file (or its info file) is missing, is not JSON, or does not match its
    schema.

    The message is one line and starts with the file's path.
    """


def info_path(path: str | Path) -> Path:
    """The info file beside metrics file `path` (metrics/train/maml.json ->
    metrics/train/maml.info.json)."""
    path = Path(path)
    if path.suffix != ".json" or is_info_file(path):
        raise ValueError(f"{path}: a metrics file is named <name>.json, not *{INFO_SUFFIX}")
    return path.with_name(path.name.removesuffix(".json") + INFO_SUFFIX)


def is_info_file(path: str | Path) -> bool:
    """Whether `path` is an info file (the text beside a metrics file)."""
    return Path(path).name.endswith(INFO_SUFFIX)


def _finite_or_none(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); everything else is left to the type check."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


OptionalFloat = Annotated[float | None, BeforeValidator(_finite_or_none)]
"""A number that may be unknown: null in the file, None here (NaN/inf are stored as null)."""


# ------------------------------------------------------------------ numbers and text
class Part(enum.Enum):
    """Which file of the pair a declared type's values go to."""

    METRIC = "metric"  # int, float, bool (or None): the metrics file, a DVC metric
    INFO = "info"  # str (or None): the info file beside it
    SPLIT = "split"  # a model or mapping holding both: split key by key


def _unwrapped(annotation: Any) -> Any:
    """`annotation` without ``Annotated`` metadata and without ``| None``."""
    if get_origin(annotation) is Annotated:
        return _unwrapped(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(options) == 1:
            return _unwrapped(options[0])
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def part_of(annotation: Any) -> Part:
    """The part of values of type `annotation` (TypeError for a type that is neither
    numbers nor text, or a union of both)."""
    if get_origin(annotation) is Annotated:
        return part_of(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        arguments = get_args(annotation)
        parts = {part_of(arg) for arg in arguments if arg is not type(None)}
        if len(parts) != 1 or (Part.SPLIT in parts and type(None) in arguments):
            raise TypeError(f"{annotation}: a metrics field holds numbers or text, not both")
        return parts.pop()
    if annotation in (int, float, bool):
        return Part.METRIC
    if annotation is str:
        return Part.INFO
    if get_origin(annotation) is dict:
        key, value = get_args(annotation)
        if key not in (str, int):
            raise TypeError(f"{annotation}: mapping keys are str or int (JSON object keys)")
        return part_of(value)
    if _is_model(annotation) and annotation.model_fields:
        parts = {part_of(field.annotation) for field in annotation.model_fields.values()}
        return parts.pop() if len(parts) == 1 else Part.SPLIT
    raise TypeError(
        f"{annotation}: a metrics field is a number, text, or a mapping or model of them"
    )


def key_annotation(annotation: Any, key: Any) -> Any | None:
    """The declared type of `key` in a value of type `annotation` as the file has it
    (None for a key the type does not declare)."""
    annotation = _unwrapped(annotation)
    if get_origin(annotation) is dict:
        return get_args(annotation)[1]
    if _is_model(annotation) and issubclass(annotation, RootModel):
        return key_annotation(annotation.model_fields["root"].annotation, key)
    if _is_model(annotation) and issubclass(annotation, MetricsFile):
        return annotation.file_key_annotation(key)
    if _is_model(annotation):
        field = annotation.model_fields.get(key)
        return None if field is None else field.annotation
    return None


def split(data: dict[str, Any], annotation: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(numbers, text) of `data`, a value of type `annotation` in file layout: each key
    goes where its declared type says; a key of a split type goes to both, with its own
    keys split the same way. Key order is kept on both sides."""
    numbers: dict[str, Any] = {}
    text: dict[str, Any] = {}
    for key, value in data.items():
        inner = key_annotation(annotation, key)
        if inner is None:
            raise TypeError(f"{annotation}: no declared type for key {key!r}")
        part = part_of(inner)
        if part is Part.METRIC:
            numbers[key] = value
        elif part is Part.INFO:
            text[key] = value
        else:
            numbers[key], text[key] = split(value, inner)
    return numbers, text


def misplaced_keys(content: dict[str, Any], annotation: Any, side: Part) -> Iterator[str]:
    """The dotted keys of one file's `content` (of schema `annotation`) whose declared
    type belongs in the other file; keys the schema does not declare are left to
    validation."""
    for key, value in content.items():
        inner = key_annotation(annotation, key)
        if inner is None:
            continue
        part = part_of(inner)
        if part is Part.SPLIT and isinstance(value, dict):
            yield from (f"{key}.{nested}" for nested in misplaced_keys(value, inner, side))
        elif part not in (side, Part.SPLIT):
            yield str(key)


class _Clash(Exception):
    """Both files have `key`, not both as an object. `fault` is the file to blame: the
    info file if only it has a non-object there, else the metrics file."""

    def __init__(self, key: str, fault: Part) -> None:
        super().__init__(key)
        self.key, self.fault = key, fault


def _merge(numbers: dict[str, Any], text: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`numbers` with `text` merged in, key by key (numbers' keys first); `_Clash` where
    both have a key and not both as an object."""
    merged = dict(numbers)
    for key, value in text.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = _merge(merged[key], value, f"{where}{key}.")
        else:
            fault = Part.INFO if isinstance(merged[key], dict) else Part.METRIC
            raise _Clash(f"{where}{key}", fault)
    return merged


# ------------------------------------------------------------------ files
def _render(data: dict[str, Any]) -> str:
    """The text of a JSON file as `metalab.io.write_json` writes it."""
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _load_object(path: Path, description: str, missing: str) -> dict[str, Any]:
    """The JSON object in `path` (a `description` file); `MetricsFileError` naming `path`
    otherwise (saying 'missing (`missing`)' if there is no such file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MetricsFileError(f"{path}: missing ({missing})") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise MetricsFileError(f"{path}: unreadable ({reason})") from None
    return _parse_object(text, path, description)


def _parse_object(text: str, source: str | Path, description: str) -> dict[str, Any]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise MetricsFileError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise MetricsFileError(f"{source}: not a JSON object (a {description} is one)")
    return content


def _one_line(problems: list[str], limit: int = 3, separator: str = "; ") -> str:
    """'where: message; where: message (and N more)' for the first `limit` problems."""
    text = separator.join(problems[:limit])
    if len(problems) > limit:
        text += f" (and {len(problems) - limit} more)"
    return " ".join(text.split())  # messages never span lines


class MetricsFile:
    """Reading, rendering and writing shared by every metrics schema (a mixin of the
    pydantic models of `metalab.records`)."""

    description: ClassVar[str] = "metrics file"
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()
    """Fields left out of the file when None (rather than written as null)."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)  # type: ignore[misc]
        if cls.model_fields:  # type: ignore[attr-defined]
            part_of(cls)  # TypeError now for a field that is neither numbers nor text

    @classmethod
    def has_info(cls) -> bool:
        """Whether the schema has text, hence an info file beside its metrics file."""
        return part_of(cls) is not Part.METRIC

    @classmethod
    def file_key_annotation(cls, key: str) -> Any | None:
        """The declared type of top-level file key `key` (None if there is no such key)."""
        field = cls.model_fields.get(key)  # type: ignore[attr-defined]
        return None if field is None else field.annotation

    @classmethod
    def file_location(cls, location: tuple) -> tuple:
        """A validation problem's location as the file's keys."""
        return location

    # -------------------------------------------------------------- reading
    @classmethod
    def read(cls, path: str | Path) -> Self:
        """The validated content of metrics file `path` and its info file; any problem
        with either is a `MetricsFileError` (one line naming the file)."""
        path = Path(path)
        if is_info_file(path):
            raise MetricsFileError(f"{path}: an info file (read the metrics file beside it)")
        numbers = _load_object(path, cls.description, cls.description)
        if not cls.has_info():
            return cls._from_parts(numbers, {}, path, path)
        info = info_path(path)
        missing = f"the text of the {cls.description} {path.name}"
        text = _load_object(info, f"{cls.description} info file", missing)
        return cls._from_parts(numbers, text, path, info)

    @classmethod
    def from_json_text(cls, text: str, source: str | Path = "<text>") -> Self:
        """Parse and validate a whole record given as one JSON object (`to_json()`);
        `source` names it in the error message."""
        return cls._validated(_parse_object(text, source, cls.description), source, source, {})

    @classmethod
    def _from_parts(
        cls, numbers: dict[str, Any], text: dict[str, Any], path: Path, info: Path
    ) -> Self:
        files = ((numbers, Part.METRIC, path, info), (text, Part.INFO, info, path))
        for content, side, source, other in files:
            wrong = list(misplaced_keys(content, cls, side))
            if wrong:
                kind = "text fields" if side is Part.METRIC else "numeric fields"
                listed = _one_line(wrong, limit=5, separator=", ")
                raise MetricsFileError(f"{source}: {kind} belong in {other.name}: {listed}")
        try:
            merged = _merge(numbers, text)
        except _Clash as clash:
            source, other = (path, info) if clash.fault is Part.METRIC else (info, path)
            raise MetricsFileError(
                f"{source}: {clash.key}: not an object, but also in {other.name}"
            ) from None
        return cls._validated(merged, path, info, text)

    @classmethod
    def _validated(
        cls, content: dict[str, Any], path: str | Path, info: str | Path, text: dict[str, Any]
    ) -> Self:
        """`content` validated strictly (a string is never taken for a number); a problem
        is reported against the file that holds, or should hold, its key."""
        try:
            return cls.model_validate(content, strict=True)  # type: ignore[attr-defined]
        except ValidationError as error:
            problems: dict[str | Path, list[str]] = {path: [], info: []}
            for problem in error.errors(include_url=False):
                location = cls.file_location(problem["loc"])
                where = ".".join(str(part) for part in location) or "(top level)"
                source = info if cls._in_info(location, text) else path
                problems[source].append(f"{where}: {problem['msg']}")
            (first, found), *others = [(s, found) for s, found in problems.items() if found]
            message = f"{first}: not a valid {cls.description}: {_one_line(found)}"
            message += "".join(f"; {source}: {_one_line(found)}" for source, found in others)
            raise MetricsFileError(message) from None

    @classmethod
    def _in_info(cls, location: tuple, text: dict[str, Any]) -> bool:
        """Whether a problem at file `location` is the info file's: its key is there, or
        its declared type is text."""
        if not location:
            return False
        node: Any = text
        for key in location:
            if not (isinstance(node, dict) and str(key) in node):
                break
            node = node[str(key)]
        else:
            return True
        annotation: Any = cls
        for key in location:
            annotation = key_annotation(annotation, key)
            if annotation is None:
                return False
        return part_of(annotation) is Part.INFO

    # -------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The whole record as plain JSON-ready data, keys in file order (without the
        `omitted_when_none` fields that are None)."""
        data = self.model_dump(mode="python")  # type: ignore[attr-defined]
        if self.omitted_when_none:
            data = {
                key: value
                for key, value in data.items()
                if not (value is None and key in self.omitted_when_none)
            }
        return data

    def parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(numbers, text): the content of the metrics file and of its info file."""
        part = part_of(type(self))
        data = self.to_dict()
        if part is Part.METRIC:
            return data, {}
        if part is Part.INFO:
            return {}, data
        return split(data, type(self))

    def to_json(self) -> str:
        """The whole record as one JSON text (what `from_json_text` reads)."""
        return _render(self.to_dict())

    def file_texts(self) -> tuple[str, str | None]:
        """The exact texts of the metrics file and of its info file (None without one)."""
        numbers, text = self.parts()
        return _render(numbers), _render(text) if self.has_info() else None

    def write(self, path: str | Path) -> None:
        """Write the numbers to metrics file `path` and the text to its info file, each
        atomically."""
        numbers, text = self.file_texts()
        if text is not None:
            write_text(info_path(path), text)
        write_text(path, numbers)


class Schema(MetricsFile, BaseModel):
    """A metrics record whose keys are all known: anything else is an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


# ------------------------------------------------------------------ shared fields
# Where a stage computed (`metalab.device.DeviceRecord`) and its GPU allocator's peaks
# (`metalab.tracking.memory_figures`); see the package docstring.
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
