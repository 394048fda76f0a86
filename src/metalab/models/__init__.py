"""Networks with an explicit body/head split.

Every model exposes ``body`` (features) and ``head`` (a linear classifier), so that
"adapt only the head" or "freeze the body" is a choice of parameter names, not a code
path. Parameter names therefore start with ``body.`` or ``head.``.
"""

from metalab.models.conv4 import Conv4, draw_dropout_masks
from metalab.models.factory import ModelConfig, build_model, head_parameter_names
from metalab.models.resnet import ResNet18

__all__ = [
    "Conv4",
    "ModelConfig",
    "ResNet18",
    "build_model",
    "draw_dropout_masks",
    "head_parameter_names",
]
