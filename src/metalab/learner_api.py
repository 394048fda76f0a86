"""The public way to use a trained model: load it, adapt it to a task, predict.

    learner = metalab.load_learner("models/maml.pt")
    support_x = torch.stack([learner.transform(image) for image in support_images])
    adapted = learner.adapt(support_x, support_y)          # support_y: 0..N-1
    logits = adapted.predict(torch.stack([learner.transform(image) for image in queries]))

A model file (``models/<name>.pt``) holds a `ModelPayload`: the algorithm, its options,
the network description, the trained way count and image size, and the best-validation
weights. Its format is defined here, beside the loader that reads it; the train stage
writes it with `save_model`. The evaluate stage uses exactly this path.
"""

from __future__ import annotations

import io
import numbers
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ValidationError

from metalab.algorithms.base import BuildContext, MetaLearner
from metalab.algorithms.registry import ALGORITHMS, build_learner, options_class, unknown_algorithm
from metalab.data.prefetch import decode_drawing
from metalab.device import resolve_device
from metalab.io import save_torch
from metalab.models.config import ModelConfig

#: Version of the model file layout; a reader refuses any other.
MODEL_FORMAT = 1
# Support labels of T tasks: an integer tensor [T, S] or one sequence of ints per task.
TaskLabels = torch.Tensor | Sequence[Sequence[int]]
REQUIRED_KEYS = ("format", "algorithm", "options", "model", "n_way", "image_size", "state_dict")


@dataclass
class ModelPayload:
    """What a model file holds: enough to rebuild the learner anywhere.

    Stored as a plain dict of tensors and plain values, so that it loads with
    ``torch.load(weights_only=True)``.
    """

    experiment: str
    algorithm: str
    options: dict[str, Any]
    model: dict[str, Any]
    n_way: int
    k_shot: int
    image_size: int
    precision: str
    state_dict: dict[str, torch.Tensor]
    best_iteration: int
    validation_accuracy: float
    format: int = MODEL_FORMAT


def save_model(path: str | Path, payload: ModelPayload) -> None:
    """Write ``payload`` to ``path`` atomically (the train stage's ``models/<name>.pt``)."""
    entries = {field.name: getattr(payload, field.name) for field in fields(payload)}
    # Same key order as earlier metalab wrote: format first.
    save_torch(path, {"format": entries.pop("format"), **entries})


class ModelFileError(ValueError):
    """A file that cannot be loaded as a metalab model (wrong kind, version or content)."""


class UnsupportedTaskError(ValueError):
    """The learner cannot handle this task shape (e.g. more ways than it has outputs)."""


class AdaptedLearner:
    """A learner adapted to one task: `predict` maps query images to logits."""

    def __init__(
        self, predictor: Callable[[torch.Tensor], Any], n_way: int, learner: Learner
    ) -> None:
        self._predictor = predictor
        self.n_way = n_way
        self._learner = learner

    def predict(self, query_x: torch.Tensor) -> torch.Tensor:
        """query_x float [Q, 1, S, S] (see `Learner.transform`) -> logits float [Q, n_way]."""
        self._learner.check_images(query_x, "query_x")
        return self._logits(query_x, 1)[0]

    __call__ = predict

    def _logits(self, query_x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The predictor's ``count`` logits tensors (one, or a tuple of ``count``) for query_x
        [..., Q, 1, S, S], each checked to be [..., Q, n_way], on query_x's device."""
        try:
            with torch.no_grad():
                outputs = self._predictor(query_x.to(self._learner.device))
        except (ValueError, RuntimeError) as error:
            self._learner.raise_if_unsupported(self.n_way, error)
            raise
        outputs, expected = outputs if count > 1 else (outputs,), (*query_x.shape[:-3], self.n_way)
        for logits in outputs:
            if logits.shape != expected:
                raise RuntimeError(
                    f"{self._learner.algorithm} returned logits of shape "
                    f"{tuple(logits.shape)}, expected {expected}"
                )
        return [logits.to(query_x.device) for logits in outputs]  # on the caller's device


class AdaptedTasks(AdaptedLearner):
    """A learner adapted to T tasks at once: `predict` maps each task's query images to
    that task's logits (with ``before_after``, to the pair of logits before and after
    adaptation, see `Learner.adapt_before_after`)."""

    def __init__(
        self,
        predictor: Callable[[torch.Tensor], Any],
        num_tasks: int,
        n_way: int,
        learner: Learner,
        before_after: bool = False,
    ) -> None:
        super().__init__(predictor, n_way, learner)
        self.num_tasks = num_tasks
        self.before_after = before_after

    def predict(self, query_x: torch.Tensor) -> Any:
        """query_x float [T, Q, 1, S, S] (task t's queries in row t) -> logits [T, Q, n_way];
        with ``before_after``, the tuple (logits before, logits after adaptation)."""
        self._learner.check_task_images(query_x, "query_x", self.num_tasks)
        logits = self._logits(query_x, 2 if self.before_after else 1)
        return tuple(logits) if self.before_after else logits[0]

    __call__ = predict


class Learner:
    """A trained meta-learner ready for new tasks (usually from `load_learner`).

    Attributes: ``algorithm``, ``experiment``, ``n_way`` and ``k_shot`` (what it was
    trained on), ``image_size`` (S), ``options`` (the algorithm's validated `Options`),
    ``adapts_by_gradient`` (whether `adapt` takes gradient steps, so that ``steps=0`` means
    "before adaptation"), ``default_adaptation_steps`` (None when not applicable) and
    ``meta_learner`` (the underlying `MetaLearner` module, in eval mode) and ``device``
    (where it computes; inputs on any device are moved there, logits come back on the
    device of the query images). ``batches_tasks``: whether `adapt_many` adapts many tasks
    in one vectorised computation (otherwise it adapts them one by one).
    """

    def __init__(
        self,
        meta_learner: MetaLearner,
        options: BaseModel,
        n_way: int,
        image_size: int,
        k_shot: int | None = None,
        experiment: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.meta_learner = meta_learner.eval().to(self.device)
        self.options = options
        self.algorithm: str = meta_learner.algorithm
        self.experiment = experiment or self.algorithm
        self.n_way = n_way
        self.k_shot = k_shot
        self.image_size = image_size
        self.adapts_by_gradient: bool = meta_learner.adapts_by_gradient
        self.default_adaptation_steps: int | None = (
            meta_learner.default_adaptation_steps if self.adapts_by_gradient else None
        )
        self.batches_tasks: bool = meta_learner.batches_tasks

    # ---------------------------------------------------------------------- images
    def transform(self, image: Image.Image | str | Path) -> torch.Tensor:
        """A PIL image (or an image file) -> float32 [1, S, S], ink = 1.0, paper = 0.0.

        Exactly the training preprocessing (`metalab.data.prefetch.decode_drawing`):
        convert to greyscale "L", Lanczos-resize to S x S, invert so dark strokes become
        ink. Expects dark strokes on a light background, like Omniglot. A transparent
        image (modes RGBA, LA, PA, or a ``transparency`` entry) is first composited onto
        white paper, so dark strokes on a transparent background work too.
        """
        if isinstance(image, str | Path):
            with Image.open(image) as opened:
                return self.transform(opened)
        buffer = io.BytesIO()
        try:
            flat = composite_on_white(image) if has_transparency(image) else image
            flat.save(buffer, format="PNG")
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(
                f"cannot use a mode {image.mode!r} image; convert it to 'L' or 'RGB' first"
            ) from error
        pixels = decode_drawing(buffer.getvalue(), self.image_size)
        return torch.from_numpy(pixels).to(torch.float32).div_(255.0).unsqueeze(0)

    def check_images(self, images: torch.Tensor, name: str) -> None:
        """Raise ValueError unless ``images`` is float [B, 1, S, S] with B >= 1 and every
        value finite and in [0, 1] (what `transform` gives: ink = 1.0, paper = 0.0)."""
        expected = (1, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape [B, 1, {self.image_size}, {self.image_size}] "
                f"(images from `transform`, stacked), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (ink = 1.0), got {images.dtype}")
        check_pixel_values(images, name)

    def check_task_images(self, images: torch.Tensor, name: str, num_tasks: int | None) -> None:
        """`check_images` for a batch of tasks: float [T, B, 1, S, S], T = ``num_tasks``
        (any T >= 1 if None)."""
        shape = tuple(images.shape)
        if images.dim() != 5 or shape[0] == 0 or shape[0] != (num_tasks or shape[0]):
            tasks = "T" if num_tasks is None else str(num_tasks)
            raise ValueError(
                f"{name} must have shape [{tasks}, B, 1, {self.image_size}, {self.image_size}] "
                f"(one row of images per task), got {shape}"
            )
        self.check_images(images.flatten(0, 1), f"{name} (tasks x images)")

    # ------------------------------------------------------------------- adaptation
    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor | Sequence[int],
        steps: int | None = None,
    ) -> AdaptedLearner:
        """Adapt to one N-way task from its labelled support set.

        support_x float [N*K, 1, S, S] in [0, 1]; support_y [N*K], a list/tuple of ints or
        an integer tensor (any integer dtype, used as int64), with every label 0..N-1
        present. N and K need not be the trained ones. ``steps`` overrides the number of
        test-time gradient steps (0 = the meta-learned starting point); learners that do
        not adapt by gradient steps ignore it. Raises `UnsupportedTaskError` when the
        learner cannot handle an N-way task (e.g. CAVIA beyond its trained way count).
        """
        self.check_images(support_x, "support_x")
        support_y = as_label_tensor(support_y, support_x.device)
        n_way = check_labels(support_y, support_x.shape[0])
        support_x, support_y = support_x.to(self.device), support_y.to(self.device)
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        try:
            predictor = self.meta_learner.adapt(support_x, support_y, steps)
        except (ValueError, RuntimeError) as error:
            self.raise_if_unsupported(n_way, error)
            raise
        return AdaptedLearner(predictor, n_way, self)

    def adapt_many(
        self, support_x: torch.Tensor, support_y: TaskLabels, steps: int | None = None
    ) -> AdaptedTasks:
        """Adapt to T tasks of one N-way K-shot shape at once (what evaluation does).

        support_x float [T, N*K, 1, S, S] in [0, 1]; support_y [T, N*K] (an integer tensor
        or one list of ints per task), every row holding every label 0..N-1 with the same N.
        Task t's predictions are those of ``adapt(support_x[t], support_y[t], steps)`` (up to
        float rounding where the learner computes many tasks in one vectorised pass, see
        ``batches_tasks``). ``steps`` and `UnsupportedTaskError` as for `adapt`.
        """
        return self._adapt_tasks(support_x, support_y, steps, both=False)

    def adapt_before_after(
        self, support_x: torch.Tensor, support_y: TaskLabels, steps: int | None = None
    ) -> AdaptedTasks:
        """`adapt_many` with 0 steps and with ``steps`` in one call (what evaluation scores
        for a learner that adapts by gradient): its `predict` returns (logits before, logits
        after), each [T, Q, N], those of ``adapt_many(.., 0)`` and ``adapt_many(.., steps)``;
        learners share the work the two have in common (ANIL, LEO: the body features)."""
        return self._adapt_tasks(support_x, support_y, steps, both=True)

    def _adapt_tasks(
        self, support_x: torch.Tensor, support_y: TaskLabels, steps: int | None, both: bool
    ) -> AdaptedTasks:
        self.check_task_images(support_x, "support_x", None)
        rows = support_y.unbind(0) if isinstance(support_y, torch.Tensor) else support_y
        labels = [as_label_tensor(row, support_x.device) for row in rows]
        if len(labels) != support_x.shape[0]:
            raise ValueError(
                f"support_y must have one row of labels per task ({support_x.shape[0]}), "
                f"got {len(labels)}"
            )
        n_ways = {check_labels(row, support_x.shape[1]) for row in labels}
        if len(n_ways) > 1:
            raise ValueError(f"every task must have the same way count, got {sorted(n_ways)}")
        (n_way,) = n_ways
        support_x = support_x.to(self.device)
        stacked = torch.stack(labels).to(self.device)
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        try:
            if both:
                predictor = self.meta_learner.adapt_before_after(support_x, stacked, steps)
            else:
                predictor = self.meta_learner.adapt_many(support_x, stacked, steps)
        except (ValueError, RuntimeError) as error:
            self.raise_if_unsupported(n_way, error)
            raise
        return AdaptedTasks(predictor, support_x.shape[0], n_way, self, before_after=both)

    def raise_if_unsupported(self, n_way: int, error: Exception) -> None:
        """Raise `UnsupportedTaskError` (caused by ``error``) when ``error`` arose on a way
        count other than the trained one: the learner cannot do such tasks. Errors on the
        trained way count are bugs or bad inputs and propagate unchanged."""
        if n_way != self.n_way:
            raise UnsupportedTaskError(
                f"{self.experiment} ({self.algorithm}, trained {self.n_way}-way) cannot handle "
                f"a {n_way}-way task: {error}"
            ) from error


#: Modes that carry an alpha channel; other modes may have a ``transparency`` entry.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
PIXEL_HINT = "images from `transform` have ink = 1.0, paper = 0.0"


def has_transparency(image: Image.Image) -> bool:
    """Whether ``image`` can have transparent pixels: an alpha mode, a palette with alpha,
    or a ``transparency`` entry (a transparent palette index or colour)."""
    palette_alpha = image.mode == "P" and image.palette is not None
    palette_alpha = palette_alpha and image.palette.mode.endswith("A")
    return image.mode in ALPHA_MODES or "transparency" in image.info or palette_alpha


def composite_on_white(image: Image.Image) -> Image.Image:
    """``image`` [W x H, any mode] alpha-composited onto opaque white paper -> mode "RGB".

    Opaque pixels keep their colour; fully transparent ones become paper (white), whatever
    colour they store. Raises ValueError for modes PIL cannot convert to RGBA.
    """
    rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, rgba).convert("RGB")


def check_pixel_values(images: torch.Tensor, name: str) -> None:
    """Raise a one-line ValueError unless every value of float ``images`` [...] is finite
    and in [0, 1]."""
    if not bool(torch.isfinite(images).all()):
        counts = {
            "NaN": int(torch.isnan(images).sum()),
            "+inf": int(torch.isposinf(images).sum()),
            "-inf": int(torch.isneginf(images).sum()),
        }
        found = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
        raise ValueError(
            f"{name} has non-finite values ({found}): only finite values in [0, 1] are "
            f"allowed; {PIXEL_HINT}"
        )
    low, high = (float(value) for value in torch.aminmax(images))
    if low < 0.0 or high > 1.0:
        # Only the offending bounds, as short floats: "min -0.5", "max 255.0".
        found = [
            f"{side} {float(f'{value:.6g}')!r}"
            for side, value, bad in (("min", low, low < 0.0), ("max", high, high > 1.0))
            if bad
        ]
        hint = "; divide 0..255 pixels by 255" if high > 1.0 else ""
        raise ValueError(
            f"{name} has values outside [0, 1] ({', '.join(found)}): {PIXEL_HINT}{hint}"
        )


def as_label_tensor(support_y: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """Support labels (a list/tuple of ints, or an integer tensor of any integer dtype)
    -> int64 [len]; a tensor keeps its device, a list goes to ``device``. Anything else
    (float tensors, non-integer items, bool) is a one-line ValueError."""
    allowed = "a list/tuple of ints or an integer tensor"
    if isinstance(support_y, torch.Tensor):
        if support_y.is_floating_point() or support_y.is_complex() or support_y.dtype == torch.bool:
            raise ValueError(
                f"support_y must be integer class indices ({allowed}), got {support_y.dtype}"
            )
        return support_y.to(torch.int64)
    if isinstance(support_y, list | tuple):
        for position, item in enumerate(support_y):
            if not isinstance(item, numbers.Integral) or isinstance(item, bool):
                shown = reprlib.repr(item).replace("\n", " ")
                raise ValueError(
                    f"support_y must be integer class indices ({allowed}), got "
                    f"support_y[{position}] = {shown} ({type(item).__name__})"
                )
        return torch.tensor([int(item) for item in support_y], dtype=torch.int64, device=device)
    raise ValueError(f"support_y must be {allowed}, got {type(support_y).__name__}")


def check_labels(support_y: torch.Tensor, num_support: int) -> int:
    """The way count N of labels support_y int64 [S] that must cover exactly 0..N-1."""
    if support_y.dim() != 1 or support_y.shape[0] != num_support:
        raise ValueError(
            f"support_y must have shape [{num_support}] (one label per support image), "
            f"got {tuple(support_y.shape)}"
        )
    if support_y.dtype != torch.int64:
        raise ValueError(f"support_y must be int64 class indices, got {support_y.dtype}")
    n_way = int(support_y.max()) + 1
    present = torch.bincount(support_y.clamp(min=0), minlength=n_way) > 0
    if int(support_y.min()) < 0 or not bool(present.all()):
        raise ValueError(
            f"support labels must be 0..N-1 with every class present, got {support_y.tolist()}"
        )
    if n_way < 2:
        raise ValueError("a task needs at least 2 classes")
    return n_way


# ----------------------------------------------------------------------------- files
def read_model_payload(path: str | Path) -> dict[str, Any]:
    """Read and check a models/<name>.pt file; clear errors for anything else.

    Loads with ``weights_only=True``: a model file holds only tensors and plain values,
    so no code from the file is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such model file (train it with `dvc repro train@<experiment>`)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises many kinds of errors for foreign bytes (KeyError, UnpicklingError,
    # RuntimeError, ...); each means the same thing here.
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ModelFileError(f"{path}: not a metalab model file ({first_line})") from error
    if not isinstance(payload, dict) or "format" not in payload:
        raise ModelFileError(f"{path}: not a metalab model file (no 'format' entry)")
    if payload["format"] != MODEL_FORMAT:
        raise ModelFileError(
            f"{path}: model format {payload['format']!r}, but this metalab reads format "
            f"{MODEL_FORMAT}; retrain the model or use the metalab version that wrote it"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ModelFileError(f"{path}: not a metalab model file (missing {', '.join(missing)})")
    if payload["algorithm"] not in ALGORITHMS:
        raise ModelFileError(f"{path}: {unknown_algorithm(payload['algorithm'])}")
    return payload


def learner_from_payload(
    payload: dict[str, Any], source: str = "model", device: torch.device | str = "cpu"
) -> Learner:
    """Rebuild the learner a Trainer payload describes, load its weights (on the CPU, so
    the same file gives the same starting point everywhere) and move it to `device`."""
    algorithm = payload["algorithm"]
    try:
        options = options_class(algorithm).model_validate(payload["options"])
        model = ModelConfig.model_validate(payload["model"])
    except ValidationError as error:
        raise ModelFileError(
            f"{source}: options do not fit this metalab's {algorithm} "
            f"({error.error_count()} problem(s), first: {error.errors()[0]['msg']})"
        ) from error
    context = BuildContext(
        model=model,
        n_way=int(payload["n_way"]),
        image_size=int(payload["image_size"]),
        precision=payload.get("precision", "fp32"),
    )
    meta_learner = build_learner(algorithm, options, context)
    try:
        meta_learner.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelFileError(
            f"{source}: weights do not fit a {algorithm} learner built from its own "
            f"description ({str(error).splitlines()[0]})"
        ) from error
    return Learner(
        meta_learner,
        options,
        n_way=context.n_way,
        image_size=context.image_size,
        k_shot=payload.get("k_shot"),
        experiment=payload.get("experiment"),
        device=device,
    )


def load_learner(path: str | Path, device: torch.device | str | None = None) -> Learner:
    """Load models/<name>.pt (written by the train stage) as a ready-to-adapt `Learner`
    computing on `device` (default: ``METALAB_DEVICE``, see `metalab.device`: the GPU when
    there is one, else the CPU).

    Raises FileNotFoundError for a missing file and `ModelFileError` for a file that is
    not a metalab model, has an unknown format version, or does not fit its algorithm.
    """
    chosen = resolve_device() if device is None else torch.device(device)
    return learner_from_payload(read_model_payload(path), source=str(path), device=chosen)
