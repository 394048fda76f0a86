"""Starting weights for a model's body, named by ``experiments.<name>.body_init``: a random
start, the body the ``pretrain`` stage trained on the meta-train classes, or a weights file
(for example torchvision's ImageNet ResNet18 weights copied into the project).

``body_init`` is a path because it is also the train stage's DVC dependency: an experiment
depends on ``models/pretrain`` only when it starts from that body. Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metalab.layout import PRETRAIN_DIR, PRETRAINED_BODY_FILE, RANDOM_BODY_INIT
from metalab.models.resnet import ResNet18


def read_weights(path: Path) -> object:
    """A weights file's content, read with ``weights_only=True`` (no code in it runs);
    ValueError naming the file when it is not a plain tensors-and-values file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # foreign, truncated or crafted bytes: all the same here
        raise ValueError(
            f"{path}: not a weights file metalab can read ({type(error).__name__})"
        ) from error


def load_body_init(model: nn.Module, body_init: str, root: Path = Path(".")) -> None:
    """Overwrite ``model.body`` with the starting weights `body_init` names (the head is
    left alone); paths are relative to the project `root`.

    * ``src/metalab/models``: the random initialisation the model was built with (no-op).
    * ``models/pretrain``: the body the ``pretrain`` stage wrote (``body.pt`` in it); its
      network must match the experiment's.
    * any other path: a state dict in torchvision's ResNet18 layout, of a Conv4 body (keys
      with or without ``body.``; ``head.*``/``fc.*`` entries are ignored) or a pretrain-stage
      file.
    """
    if Path(body_init) == Path(RANDOM_BODY_INIT):
        return
    background = Path(body_init) == PRETRAIN_DIR
    path = root / (PRETRAINED_BODY_FILE if background else Path(body_init))
    if not path.is_file():
        hint = (
            "run the pretrain stage first"
            if background
            else f"body_init is {RANDOM_BODY_INIT} (random start), {PRETRAIN_DIR} (the "
            "pretrain stage's body) or a weights file"
        )
        raise FileNotFoundError(f"body weights file {path} does not exist; {hint}")
    payload = read_weights(path)
    if background:
        if not isinstance(payload, dict) or "body" not in payload:
            raise ValueError(f"{path} is not a pretrain-stage file (no 'body' entry)")
        expected = "resnet18" if isinstance(model, ResNet18) else "conv4"
        trained = payload.get("model", {}).get("name", expected)
        if trained != expected:
            raise ValueError(f"{path} holds a {trained} body, the experiment uses {expected}")
    if isinstance(payload, dict) and isinstance(payload.get("body"), dict):
        payload = payload["body"]
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(payload).__name__}")
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
