"""The four-block convolutional network used throughout the few-shot literature."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def _block(in_channels: int, out_channels: int, downsample: str) -> nn.Sequential:
    if downsample == "maxpool":
        # ProtoNets / the seed: Conv3x3 + BN + ReLU + MaxPool2.
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
    # MAML's Omniglot network: stride-2 convolutions, no pooling (about 4x fewer FLOPs).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    )


class Conv4(nn.Module):
    """Four blocks of Conv3x3(hidden) + BatchNorm + ReLU (+ MaxPool2), then a linear head.

    BatchNorm always normalises with the statistics of the batch it sees (transductive,
    as in MAML's reference code): ``track_running_stats=False``, so train and eval mode
    behave the same and no running statistics leak across tasks.

    Input ``x``: float [B, in_channels, H, W]; output logits: [B, n_way]. The feature size
    is derived from ``image_size``, so 28x28 and 105x105 both work.
    """

    def __init__(
        self,
        n_way: int,
        image_size: int = 28,
        in_channels: int = 1,
        hidden: int = 64,
        downsample: Literal["maxpool", "stride"] = "maxpool",
    ) -> None:
        super().__init__()
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.body = nn.Sequential(
            *(_block(channels[i], channels[i + 1], downsample) for i in range(4)),
        )
        with torch.no_grad():
            probe = self.body(torch.zeros(2, in_channels, image_size, image_size))
        self.feature_dim = probe[0].numel()
        self.head = nn.Linear(self.feature_dim, n_way)
        self.block_output_shapes = self._block_output_shapes(in_channels, image_size)

    def _block_output_shapes(self, in_channels: int, image_size: int) -> list[tuple[int, ...]]:
        shapes = []
        with torch.no_grad():
            h = torch.zeros(2, in_channels, image_size, image_size)
            for block in self.body:
                h = block(h)
                shapes.append(tuple(h.shape[1:]))
        return shapes

    def features(
        self, x: torch.Tensor, dropout_masks: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """Body features, float [B, feature_dim].

        ``dropout_masks``: optional per-block masks broadcastable to the block output
        [B, C, H', W'] (e.g. [1, C, H', W'] drawn once per task, see `draw_dropout_masks`).
        """
        for index, block in enumerate(self.body):
            x = block(x)
            if dropout_masks is not None and dropout_masks[index] is not None:
                x = x * dropout_masks[index]
        return x.flatten(1)

    def forward(
        self, x: torch.Tensor, dropout_masks: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        return self.head(self.features(x, dropout_masks))


def draw_dropout_masks(
    shapes: list[tuple[int, ...]],
    rates: list[float],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor | None]:
    """Inverted-dropout masks, one per block, each [1, *shape], values 0 or 1/(1-rate).

    Drawn once per task and reused for every inner step and the query pass, so the task
    sees one fixed thinned network (task dropout, the seed project's 'Meta Dropout'). The
    numbers come from ``generator`` on its own device (None: torch's global CPU
    generator), so a seed gives the same masks whatever ``device`` the masks are then
    moved to (default: the generator's device).
    """
    if len(shapes) != len(rates):
        raise ValueError(
            f"need one dropout rate per block: {len(shapes)} blocks, {len(rates)} rates"
        )
    source = torch.device("cpu") if generator is None else generator.device
    target = source if device is None else torch.device(device)
    masks: list[torch.Tensor | None] = []
    for shape, rate in zip(shapes, rates, strict=True):
        if rate <= 0:
            masks.append(None)
            continue
        keep = torch.rand((1, *shape), generator=generator, device=source) >= rate
        masks.append((keep.to(dtype) / (1.0 - rate)).to(target))
    return masks
