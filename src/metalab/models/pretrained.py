"""Starting weights for a model's body: ImageNet (local torch hub cache), a file, or the
body pretrained on the meta-train classes by the ``pretrain`` stage.

Nothing here downloads: ImageNet weights are read from the torch hub cache only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from metalab.models.resnet import ResNet18

PretrainedSource = Literal["none", "torchvision", "file", "background"]
TORCHVISION_RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ImageNet1K_V1 weights


def torchvision_resnet18_path() -> Path:
    """Where torchvision caches the ImageNet ResNet18 weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_RESNET18_FILE


def read_weights(path: Path) -> object:
    """A weights file's content, read with ``weights_only=True`` (no code in it runs);
    ValueError naming the file when it is not a plain tensors-and-values file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # foreign, truncated or crafted bytes: all the same here
        raise ValueError(
            f"{path}: not a weights file metalab can read ({type(error).__name__})"
        ) from error


def load_pretrained_body(model: nn.Module, source: PretrainedSource, path: str | None) -> None:
    """Overwrite ``model.body`` with pretrained weights (the head is left alone).

    * ``none``: do nothing.
    * ``torchvision``: ImageNet ResNet18 weights from the local torch hub cache (ResNet18
      only; RGB ``conv1`` averaged to one channel). Never downloads.
    * ``file``: a state dict at ``path``: torchvision layout for ResNet18, or a Conv4 body
      (keys with or without ``body.``; ``head.*``/``fc.*`` entries are ignored).
    * ``background``: the file the ``pretrain`` stage writes (``{"body": state_dict, ...}``).
    """
    if source == "none":
        return
    if source == "torchvision":
        if not isinstance(model, ResNet18):
            raise ValueError("pretrained source 'torchvision' needs the resnet18 model")
        weights = torchvision_resnet18_path()
        if not weights.exists():
            raise FileNotFoundError(
                f"ImageNet ResNet18 weights not found at {weights}; metalab never downloads "
                f"them. Put {TORCHVISION_RESNET18_FILE} (torchvision's ResNet18_Weights."
                "IMAGENET1K_V1) into $TORCH_HOME/hub/checkpoints, or use pretrained source "
                "'file' with an explicit path."
            )
        load_body_weights(model, read_weights(weights))
        return
    if source not in ("file", "background"):
        raise ValueError(f"unknown pretrained source {source!r}")
    if path is None:
        raise ValueError(f"pretrained source {source!r} needs a path")
    if not Path(path).exists():
        hint = " (run the pretrain stage first)" if source == "background" else ""
        raise FileNotFoundError(f"pretrained body file {path} does not exist{hint}")
    payload = read_weights(Path(path))
    if source == "background":
        if not isinstance(payload, dict) or "body" not in payload:
            raise ValueError(f"{path} is not a pretrain-stage file (no 'body' entry)")
        expected = "resnet18" if isinstance(model, ResNet18) else "conv4"
        trained = payload.get("model", {}).get("name", expected)
        if trained != expected:
            raise ValueError(f"{path} holds a {trained} body, the experiment uses {expected}")
        payload = payload["body"]
    elif isinstance(payload, dict) and isinstance(payload.get("body"), dict):
        payload = payload["body"]
    load_body_weights(model, payload)


def load_body_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load body weights given as a state dict (of the body, or of a whole model).

    ResNet18 goes through `ResNet18.load_body_state_dict` (torchvision layout). Other
    models (Conv4): ``body.`` prefixes are stripped, ``head.*``/``fc.*`` dropped, and a first
    convolution with a different number of input channels is averaged over them.
    """
    if isinstance(model, ResNet18):
        model.load_body_state_dict(state_dict)
        return
    cleaned = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "fc.")):
            continue
        cleaned[key.removeprefix("body.")] = value
    expected = model.body.state_dict()
    for key, value in cleaned.items():
        target = expected.get(key)
        colour_mismatch = (
            target is not None
            and value.dim() == 4
            and value.shape[1] != target.shape[1]
            and (value.shape[0], *value.shape[2:]) == (target.shape[0], *target.shape[2:])
        )
        if colour_mismatch:
            # An RGB first convolution applied to grey images: average the colour channels.
            cleaned[key] = value.mean(dim=1, keepdim=True).expand_as(target)
    try:
        missing, unexpected = model.body.load_state_dict(cleaned, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"body weights do not fit {type(model).__name__}: {error}") from error
    if missing or unexpected:
        raise ValueError(
            f"body weights do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
