"""Build a model from its params.yaml description."""

from __future__ import annotations

from torch import nn

from metalab.models.config import ModelConfig
from metalab.models.conv4 import Conv4
from metalab.models.resnet import ResNet18


def build_model(config: ModelConfig, n_way: int, image_size: int) -> nn.Module:
    """A freshly initialised model for ``n_way`` classes on ``image_size`` square images."""
    if config.name == "conv4":
        return Conv4(n_way, image_size, hidden=config.hidden, downsample=config.downsample)
    return ResNet18(n_way)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the head's parameters (the ones ANIL adapts)."""
    return [name for name, _ in model.named_parameters() if name.startswith("head.")]
