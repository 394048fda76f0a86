"""Supervised pretraining of a body on the meta-train classes (the start of ANIL S3-S5).

Ordinary classification: a fresh linear head over all given classes, cross-entropy, Adam,
no augmentation. The caller passes only meta-train classes, so validation and meta-test
characters stay unseen. `pretraining_sets` holds out the last few drawings of every
meta-train character: the validation curve (loss and accuracy on drawings the body never
trained on, of characters it trains on) is measured a few times per epoch, which is what
the epoch count in params.yaml is read from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm import tqdm

from metalab.algorithms.precision import Precision, autocast, check_precision
from metalab.data.config import DataConfig
from metalab.data.prefetch import OmniglotArrays
from metalab.data.splits import Split
from metalab.models.config import ModelConfig, PretrainConfig
from metalab.models.factory import build_model
from metalab.schema import Sections, TrackingConfig, load_sections

#: The columns of a curve row (`pretrain_body`'s ``on_log``; plots/pretrain.csv): the
#: fractional epoch and the optimizer steps so far, the training loss and accuracy over the
#: images since the previous row, and the held-out drawings' loss and accuracy (absent
#: without held-out drawings).
CURVE_COLUMNS = ("epoch", "step", "loss", "accuracy", "validation_loss", "validation_accuracy")
#: Images per forward pass when measuring the held-out drawings (no gradients kept).
VALIDATION_BATCH = 512


class PretrainParams(Sections):
    """The sections the pretrain stage reads: ``data`` (the split), ``pretrain``, ``tracking``."""

    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def load_pretrain_params(path: str | Path = "params.yaml") -> PretrainParams:
    """Read and validate the pretrain stage's sections; `ParamsError` with a one-line message."""
    return load_sections(path, PretrainParams)


def _drawings(
    arrays: OmniglotArrays, characters: torch.Tensor, drawings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [C*K, S, S] of drawings `drawings` (int [K]) of each of `characters`
    (int [C]), character by character, and labels int64 [C*K]: the character's position in
    `characters`."""
    rows = (characters.view(-1, 1) * arrays.drawings_per_character + drawings).flatten()
    labels = torch.arange(characters.numel()).repeat_interleave(drawings.numel())
    return arrays.images[rows], labels


def meta_train_drawings(
    arrays: OmniglotArrays, split: Split, drawings_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawings of the meta-train characters (the first `drawings_per_class` of each,
    default all D) and their characters: images uint8 [C*D, S, S], labels int64 [C*D]
    (character ids). Validation and meta-test characters are left out, so they stay
    unseen by the pretrained body."""
    drawings = min(
        drawings_per_class or arrays.drawings_per_character, arrays.drawings_per_character
    )
    return _drawings(arrays, split.meta_train[:, 0].unique(), torch.arange(drawings))


@dataclass(frozen=True)
class PretrainingSets:
    """Training and held-out drawings of the meta-train characters.

    images uint8 [N, S, S], labels int64 [N]; validation_images uint8 [M, S, S],
    validation_labels int64 [M] (M = 0 when nothing is held out). Labels are the
    character's index among the meta-train characters, the same in both sets.
    """

    images: torch.Tensor
    labels: torch.Tensor
    validation_images: torch.Tensor
    validation_labels: torch.Tensor


def pretraining_sets(
    arrays: OmniglotArrays,
    split: Split,
    validation_drawings: int,
    drawings_per_class: int | None = None,
) -> PretrainingSets:
    """Split the drawings of the meta-train characters: the last `validation_drawings` of
    each character are held out, training takes the first `drawings_per_class` of the rest
    (default all of them). No validation or meta-test character appears in either set."""
    total = arrays.drawings_per_character
    if not 0 <= validation_drawings < total:
        raise ValueError(
            f"pretrain.validation_drawings = {validation_drawings}: must be 0 to {total - 1} "
            f"(each character has {total} drawings)"
        )
    kept = total - validation_drawings
    training = min(drawings_per_class or kept, kept)
    characters = split.meta_train[:, 0].unique()
    images, labels = _drawings(arrays, characters, torch.arange(training))
    held_out, held_out_labels = _drawings(arrays, characters, torch.arange(kept, total))
    return PretrainingSets(images, labels, held_out, held_out_labels)


def build_pretrain_model(
    model_config: ModelConfig,
    num_classes: int,
    image_size: int,
    seed: int,
    channels_last: bool = False,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A fresh `model_config` network with a `num_classes`-way head, in training mode on
    `device` (channels-last weights if asked). Built on the CPU under `seed` so that it
    starts the same everywhere; the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_config, num_classes, image_size)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.train()


def batch_input(
    images: torch.Tensor, device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    """uint8 [B, S, S] (255 = ink) -> float [B, 1, S, S] in [0, 1] on `device`."""
    x = images.unsqueeze(1).to(device).float().div(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: Precision = "fp32",
) -> tuple[float, int]:
    """One optimizer step on float [B, 1, S, S] images `x` of classes int [B] `y`; returns
    (mean cross-entropy, correct predictions) of the batch, before the step."""
    with autocast(precision, x.device.type):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # float32 whatever the forward's precision
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(dim=1) == y).sum())


@torch.no_grad()
def measure(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    precision: Precision = "fp32",
    channels_last: bool = False,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on uint8 [M, S, S] `images` of classes int
    [M] `targets`, in evaluation mode (BatchNorm with its running statistics, so the
    result does not depend on how the images are batched); the mode is restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, images.shape[0], VALIDATION_BATCH):
        x = batch_input(images[start : start + VALIDATION_BATCH], device, channels_last)
        y = targets[start : start + VALIDATION_BATCH].to(device)
        with autocast(precision, x.device.type):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    return loss_sum / images.shape[0], correct / images.shape[0]


def curve_points(batches_per_epoch: int, evaluations_per_epoch: int) -> frozenset[int]:
    """The batch numbers within an epoch (1-based) after which a curve row is recorded:
    `evaluations_per_epoch` of them (at most one per batch), evenly spaced, the last
    batch always among them."""
    count = min(evaluations_per_epoch, batches_per_epoch)
    return frozenset(-(-k * batches_per_epoch // count) for k in range(1, count + 1))


def pretrain_body(
    model_config: ModelConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
    on_log: Callable[[dict[str, float], int], None] | None = None,
    *,
    validation_images: torch.Tensor | None = None,
    validation_labels: torch.Tensor | None = None,
    evaluations_per_epoch: int = 1,
    precision: Precision = "fp32",
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Train ``model_config``'s network to classify ``images`` on `device` and return its
    body's weights (on the CPU, contiguous whatever the memory format trained in).

    images: uint8 [N, S, S] (255 = ink, read as ``images / 255``); labels: int [N], any class
    ids (remapped to 0..C-1). validation_images, validation_labels: uint8 [M, S, S] and int
    [M] of the same class ids (optional), measured `evaluations_per_epoch` times per epoch
    (`curve_points`). Deterministic given ``seed`` (initialisation and batch order; the
    global torch RNG is left as it was) at a fixed thread count. Returns the body's state
    dict (keys without ``body.``), which `metalab.models.pretrained.load_body_init` loads.
    At each curve point, `on_log` (if given) receives the row (`CURVE_COLUMNS`: training
    loss and accuracy over the images since the previous row, then the held-out ones') and
    the optimizer steps so far. `precision` ``bf16`` runs the forward passes under bf16
    autocast (parameters and optimizer state stay float32); `channels_last` trains with
    channels-last weights and inputs.
    """
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 [N, S, S], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"need one label per image: {labels.shape[0]} vs {images.shape[0]}")
    precision = check_precision(precision)
    classes, targets = torch.unique(labels, return_inverse=True)
    validation_targets = None
    if validation_images is not None and validation_images.shape[0] > 0:
        if validation_labels is None or validation_labels.shape != validation_images.shape[:1]:
            raise ValueError("need one validation label per validation image")
        validation_targets = torch.searchsorted(classes, validation_labels)
        known = validation_targets < classes.numel()
        if not bool(known.all()) or not torch.equal(
            classes[validation_targets[known]], validation_labels[known]
        ):
            raise ValueError("validation labels include classes the training images lack")
    order_generator = torch.Generator().manual_seed(seed)
    model = build_pretrain_model(
        model_config, classes.numel(), images.shape[-1], seed, channels_last, device
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches_per_epoch = -(-images.shape[0] // batch_size)
    points = curve_points(batches_per_epoch, evaluations_per_epoch)
    bar = tqdm(
        total=epochs * batches_per_epoch, desc="pretrain", disable=not progress, dynamic_ncols=True
    )
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=order_generator)
        seen, correct, loss_sum = 0, 0, 0.0  # since the last curve row
        for batch_number, start in enumerate(range(0, images.shape[0], batch_size), 1):
            batch = order[start : start + batch_size]
            x = batch_input(images[batch], device, channels_last)
            loss, hits = train_step(model, optimizer, x, targets[batch].to(device), precision)
            step += 1
            seen += batch.numel()
            correct += hits
            loss_sum += loss * batch.numel()
            bar.set_postfix(
                epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}"
            )
            bar.update(1)
            if batch_number not in points:
                continue
            row = {
                "epoch": round(step / batches_per_epoch, 4),
                "step": float(step),
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
            }
            if validation_targets is not None:
                assert validation_images is not None
                row["validation_loss"], row["validation_accuracy"] = measure(
                    model, validation_images, validation_targets, precision, channels_last
                )
                bar.set_postfix(epoch=epoch + 1, val_acc=f"{row['validation_accuracy']:.3f}")
            if on_log is not None:
                on_log(row, step)
            seen, correct, loss_sum = 0, 0, 0.0
    bar.close()
    return {
        name: value.detach().to("cpu").contiguous().clone()
        for name, value in model.body.state_dict().items()
    }
