"""Supervised pretraining of a body on the meta-train classes (the start of ANIL S3-S5).

Ordinary classification: a fresh linear head over all given classes, cross-entropy, Adam,
no augmentation. The caller passes only meta-train classes, so validation and meta-test
characters stay unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm import tqdm

from metalab.data.config import DataConfig
from metalab.data.prefetch import OmniglotArrays
from metalab.data.splits import Split
from metalab.models.config import ModelConfig, PretrainConfig
from metalab.models.factory import build_model
from metalab.schema import Sections, TrackingConfig, load_sections


class PretrainParams(Sections):
    """The sections the pretrain stage reads: ``data`` (the split), ``pretrain``, ``tracking``."""

    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def load_pretrain_params(path: str | Path = "params.yaml") -> PretrainParams:
    """Read and validate the pretrain stage's sections; `ParamsError` with a one-line message."""
    return load_sections(path, PretrainParams)


def meta_train_drawings(
    arrays: OmniglotArrays, split: Split, drawings_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawings of the meta-train characters (the first `drawings_per_class` of each,
    default all D) and their characters: images uint8 [C*D, S, S], labels int64 [C*D]
    (character ids). Validation and meta-test characters are left out, so they stay
    unseen by the pretrained body."""
    characters = split.meta_train[:, 0].unique()
    drawings = min(
        drawings_per_class or arrays.drawings_per_character, arrays.drawings_per_character
    )
    rows = (
        characters.view(-1, 1) * arrays.drawings_per_character + torch.arange(drawings)
    ).flatten()
    labels = torch.arange(characters.numel()).repeat_interleave(drawings)
    return arrays.images[rows], labels


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
    on_epoch: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``model_config``'s network to classify ``images`` on `device` and return its
    body's weights (on the CPU).

    images: uint8 [N, S, S] (255 = ink, read as ``images / 255``); labels: int [N], any class
    ids (remapped to 0..C-1). Deterministic given ``seed`` (initialisation and batch order;
    the global torch RNG is left as it was). Returns the body's state dict (keys without
    ``body.``), which `metalab.models.pretrained.load_body_init` loads. After each epoch,
    `on_epoch` (if given) receives ``{"loss": ..., "accuracy": ...}`` (the epoch's mean
    training loss and accuracy, over its images) and the epoch number (0-based).
    """
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 [N, S, S], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"need one label per image: {labels.shape[0]} vs {images.shape[0]}")
    _, targets = torch.unique(labels, return_inverse=True)
    num_classes = int(targets.max()) + 1
    order_generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: the same start everywhere
        torch.manual_seed(seed)
        model = build_model(model_config, num_classes, images.shape[-1])
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches_per_epoch = -(-images.shape[0] // batch_size)
    bar = tqdm(
        total=epochs * batches_per_epoch, desc="pretrain", disable=not progress, dynamic_ncols=True
    )
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=order_generator)
        seen, correct, loss_sum = 0, 0, 0.0
        for start in range(0, images.shape[0], batch_size):
            batch = order[start : start + batch_size]
            x = images[batch].unsqueeze(1).to(device).float().div(255.0)
            y = targets[batch].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += batch.numel()
            correct += int((logits.argmax(dim=1) == y).sum())
            loss_sum += loss.item() * batch.numel()
            bar.set_postfix(
                epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}"
            )
            bar.update(1)
        if on_epoch is not None:
            on_epoch({"loss": loss_sum / seen, "accuracy": correct / seen}, epoch)
    bar.close()
    return {
        name: value.detach().to("cpu", copy=True) for name, value in model.body.state_dict().items()
    }
