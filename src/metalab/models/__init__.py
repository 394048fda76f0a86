"""Networks with an explicit body/head split.

Every model exposes ``body`` (features) and ``head`` (a linear classifier), so that
"adapt only the head" or "freeze the body" is a choice of parameter names, not a code
path. Parameter names therefore start with ``body.`` or ``head.``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metalab.models.config import ModelConfig
    from metalab.models.conv4 import Conv4, draw_dropout_masks
    from metalab.models.factory import build_model, head_parameter_names
    from metalab.models.resnet import ResNet18

# Lazy exports: `metalab.models.config` (the params.yaml schema) stays free of torch.
_EXPORTS = {
    "Conv4": "metalab.models.conv4",
    "draw_dropout_masks": "metalab.models.conv4",
    "ModelConfig": "metalab.models.config",
    "build_model": "metalab.models.factory",
    "head_parameter_names": "metalab.models.factory",
    "ResNet18": "metalab.models.resnet",
}

__all__ = [
    "Conv4",
    "ModelConfig",
    "ResNet18",
    "build_model",
    "draw_dropout_masks",
    "head_parameter_names",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'metalab.models' has no attribute {name!r}")
