"""torchvision's ResNet18 as a one-channel body with a separate linear head."""

from __future__ import annotations

import torch
from torch import nn

_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class ResNet18(nn.Module):
    """ResNet18 body (torchvision layout, one-channel ``conv1``, no ``fc``) + linear head.

    Input ``x``: float [B, 1, H, W] (28x28 works: the spatial size reaches 1x1); output
    logits [B, n_way]. Body parameter names are torchvision's prefixed with ``body.``
    (``body.layer4.1.conv2.weight``), which is what per-layer learning-rate patterns match.
    """

    feature_dim = 512

    def __init__(self, n_way: int, in_channels: int = 1) -> None:
        super().__init__()
        # Imported here: it costs seconds in every process that never builds a ResNet.
        import torchvision

        body = torchvision.models.resnet18(weights=None)
        body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        body.fc = nn.Identity()
        self.body = body
        self.head = nn.Linear(self.feature_dim, n_way)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Body features, float [B, 512]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def load_body_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load torchvision-layout weights into the body.

        RGB ``conv1`` weights [64, 3, 7, 7] are averaged over the colour channels, which
        keeps the response to a grey image equal to the RGB net's response to it. ``fc.*``
        entries (ImageNet classifier) are dropped; keys may carry a ``body.`` prefix.
        BatchNorm running statistics are dropped when the body's BatchNorm layers keep none
        (the MAML family normalises with batch statistics only).
        """
        expected = set(self.body.state_dict())
        cleaned = {}
        for key, value in state_dict.items():
            key = key.removeprefix("body.")
            if key.startswith("fc."):
                continue
            if key.endswith(_RUNNING_STATISTICS) and key not in expected:
                continue
            if key == "conv1.weight" and value.shape[1] != self.body.conv1.in_channels:
                value = value.mean(dim=1, keepdim=True).expand(
                    -1, self.body.conv1.in_channels, -1, -1
                )
            cleaned[key] = value
        missing, unexpected = self.body.load_state_dict(cleaned, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"body weights do not fit ResNet18: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
