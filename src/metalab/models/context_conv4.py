"""Conv4 conditioned on a per-task context vector through FiLM (CAVIA's network)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv3x3 + BatchNorm (+ optional FiLM) + ReLU (+ MaxPool2), as in `Conv4`.

    BatchNorm uses the statistics of the batch it sees (``track_running_stats=False``),
    exactly like `Conv4`, so nothing leaks across tasks.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: str) -> None:
        super().__init__()
        stride = 2 if downsample == "stride" else 1
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.pool = nn.MaxPool2d(2) if downsample == "maxpool" else nn.Identity()

    def forward(
        self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, C_out, H', W']; ``film`` = (scale, shift), each [C_out]."""
        x = self.norm(self.conv(x))
        if film is not None:
            scale, shift = film
            x = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return self.pool(torch.relu(x))


class ContextBody(nn.Module):
    """Four `ConvBlock`s; the context vector modulates one of them through FiLM.

    ``film`` is a learned linear map context [P] -> (scale offset, shift), each [hidden];
    the block's channels become ``(1 + scale offset) * h + shift`` between BatchNorm and
    ReLU. The map's bias starts at zero so a zero context leaves the network unmodulated;
    its weights keep PyTorch's default (non-zero) initialisation, because with zero
    weights the gradient with respect to the context would be zero and never move it.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        downsample: str,
        num_context_params: int,
        film_block: int,
    ) -> None:
        super().__init__()
        if not 0 <= film_block < 4:
            raise ValueError(f"film_block must be 0..3, got {film_block}")
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.blocks = nn.ModuleList(
            ConvBlock(channels[i], channels[i + 1], downsample) for i in range(4)
        )
        self.film = nn.Linear(num_context_params, 2 * hidden)
        nn.init.zeros_(self.film.bias)
        self.hidden = hidden
        self.film_block = film_block

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], context [P] -> features [B, feature_dim]."""
        film_output = self.film(context)
        film = (1.0 + film_output[: self.hidden], film_output[self.hidden :])
        for index, block in enumerate(self.blocks):
            x = block(x, film if index == self.film_block else None)
        return x.flatten(1)


class ContextConv4(nn.Module):
    """Conv4 whose ``film_block``-th block is FiLM-modulated by a context vector.

    CAVIA adapts only the context (``num_context_params`` values, zero at the start of
    every task); all `nn.Parameter`s here are meta-parameters. Parameter names start with
    ``body.`` (including ``body.film``) or ``head.``.

    ``forward(x [B, in_channels, H, W], context [P]) -> logits [B, n_way]``.
    """

    def __init__(
        self,
        n_way: int,
        image_size: int = 28,
        in_channels: int = 1,
        hidden: int = 64,
        downsample: Literal["maxpool", "stride"] = "maxpool",
        num_context_params: int = 100,
        film_block: int = 2,
    ) -> None:
        super().__init__()
        self.num_context_params = num_context_params
        self.body = ContextBody(in_channels, hidden, downsample, num_context_params, film_block)
        with torch.no_grad():
            probe = self.body(
                torch.zeros(2, in_channels, image_size, image_size),
                torch.zeros(num_context_params),
            )
        self.feature_dim = probe.shape[1]
        self.head = nn.Linear(self.feature_dim, n_way)

    def initial_context(self) -> torch.Tensor:
        """The context every task starts from: zeros [P] in the parameters' dtype/device."""
        reference = self.head.weight
        return torch.zeros(self.num_context_params, dtype=reference.dtype, device=reference.device)

    def features(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Body features, float [B, feature_dim]."""
        return self.body(x, context)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x, context))
