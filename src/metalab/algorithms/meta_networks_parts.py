"""The pieces of Meta Networks (`metalab.algorithms.meta_networks`): layer-augmented conv
nets (a slow and a fast path per layer), the gradient preprocessing of the meta learner's
inputs, attention over the example-level memory and the representation learner's pairs."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = ("conv", "fc")


# -- layer-augmented networks ---------------------------------------------------------------


def conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, Cin, H, W]; weight shared [Cout, Cin, 3, 3] or per example [B, Cout, Cin, 3, 3]
    -> [B, Cout, H, W] (padding 1). Per-example weights run as one grouped convolution."""
    if weight.dim() == 4:
        return F.conv2d(x, weight, padding=1)
    batch, channels, height, width = x.shape
    out_channels = weight.shape[1]
    grouped = F.conv2d(
        x.reshape(1, batch * channels, height, width),
        weight.reshape(batch * out_channels, channels, 3, 3),
        padding=1,
        groups=batch,
    )
    return grouped.reshape(batch, out_channels, height, width)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, I]; weight shared [O, I] or per example [B, O, I] -> [B, O] (no bias)."""
    if weight.dim() == 2:
        return x @ weight.T
    return torch.einsum("bi,boi->bo", x, weight)


def augmented_features(
    x: torch.Tensor, slow: list[torch.Tensor], fast: list[torch.Tensor] | None
) -> torch.Tensor:
    """Layer-augmented conv blocks: x [B, 1, S, S] -> [B, D].

    Block l: MaxPool2(ReLU(conv(h, slow[l])) + ReLU(conv(h, fast[l]))), the fast path left
    out when ``fast`` is None. Weights shared or per example (`conv3x3`)."""
    h = x
    for index, weight in enumerate(slow):
        out = F.relu(conv3x3(h, weight))
        if fast is not None:
            out = out + F.relu(conv3x3(h, fast[index]))
        # ceil_mode: 5 blocks still fit a 28x28 (or 16x16) image, as Chainer's pooling does.
        h = F.max_pool2d(out, 2, ceil_mode=True)
    return h.flatten(1)


class AugmentedConvNet(nn.Module):
    """The slow weights of b or u: ``body`` (conv weights [C, Cin, 3, 3], no biases, as the
    reference code) and ``fc`` (the hidden layer [H, D] and, with ``outputs``, an output
    layer [outputs, H]); D = C x (final spatial size)^2. The forward passes are functions
    of explicit weight lists (`MetaNetworks.base_logits`, `.representation_keys`)."""

    def __init__(
        self, channels: int, conv_layers: int, fc_units: int, image_size: int, outputs: int | None
    ) -> None:
        super().__init__()
        sizes = [1] + [channels] * conv_layers
        self.body = nn.ParameterList(
            nn.Parameter(torch.empty(sizes[i + 1], sizes[i], 3, 3)) for i in range(conv_layers)
        )
        spatial = image_size
        for _ in range(conv_layers):
            spatial = math.ceil(spatial / 2)
        self.feature_dim = channels * spatial * spatial
        shapes = [(fc_units, self.feature_dim)] + ([(outputs, fc_units)] if outputs else [])
        self.fc = nn.ParameterList(nn.Parameter(torch.empty(*shape)) for shape in shapes)
        for weight in [*self.body, self.fc[0]]:
            # He init (std sqrt(2 / fan_in)): without BatchNorm, a smaller start (Chainer's
            # LeCun normal in the reference code) shrinks the signal at every ReLU block,
            # and 5 blocks start with all logits ~0.
            nn.init.normal_(weight, std=math.sqrt(2.0) * fan_in_scale(weight))
        if outputs:
            # Near-zero output layer: training starts from uniform predictions, not from
            # large random logits that the fast weights would first have to outweigh.
            nn.init.normal_(self.fc[1], std=0.01 * fan_in_scale(self.fc[1]))

    def weights(self) -> list[torch.Tensor]:
        """The slow weights in layer order: conv weights, then the fc weights."""
        return [*self.body, *self.fc]


def fan_in_scale(weight: torch.Tensor) -> float:
    """1/sqrt(fan_in) of a weight [out, in, ...] (its init scale)."""
    return 1.0 / math.sqrt(weight[0].numel())


def preprocess_gradients(gradients: torch.Tensor, k: float | None) -> torch.Tensor:
    """Per-coordinate inputs of m and d: gradients [...] -> [..., 2] ([..., 1] if k None).

    (clamp(log(|g| + eps) / k, min=-1), clamp(g e^k, -1, 1)): the magnitude on a log scale
    and the sign, both O(1) whatever the gradient's scale (reference code, k = 7)."""
    if k is None:
        return gradients.unsqueeze(-1)
    eps = torch.finfo(gradients.dtype).eps
    magnitude = (torch.log(gradients.abs() + eps) / k).clamp(min=-1.0)
    sign = (gradients * math.exp(k)).clamp(-1.0, 1.0)
    return torch.stack([magnitude, sign], dim=-1)


def attention(query_keys: torch.Tensor, memory_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over the memory of scale x cosine similarity: query_keys [Q, H], memory_keys
    [S, H] -> weights [Q, S] (rows sum to 1)."""
    cosine = F.normalize(query_keys, dim=-1, eps=1e-8) @ F.normalize(memory_keys, dim=-1).T
    return torch.softmax(scale * cosine, dim=-1)


def representation_pairs(
    keys: torch.Tensor, labels: torch.Tensor, scale: float, parts: int
) -> list[torch.Tensor]:
    """The paper's verification loss on support pairs, cut into ``parts`` scalars.

    keys [S, H], labels [S]: every unordered pair (i < j) in a fixed order, target 1 when
    both have the same label; BCE of scale x cosine(key_i, key_j). Part t is the mean over
    its consecutive pairs (the last parts one pair shorter where they do not divide)."""
    count = keys.shape[0]
    if count < 2:
        raise ValueError("the pairs representation loss needs at least 2 support examples")
    first, second = torch.triu_indices(count, count, 1, device=keys.device)
    normalised = F.normalize(keys, dim=-1, eps=1e-8)
    cosine = (normalised[first] * normalised[second]).sum(-1)  # [pairs]
    same = (labels[first] == labels[second]).to(cosine.dtype)
    losses = F.binary_cross_entropy_with_logits(scale * cosine, same, reduction="none")
    return [part.mean() for part in losses.tensor_split(min(parts, losses.shape[0]))]


class TaskMemory(NamedTuple):
    """What a task's support set leaves for its queries (S support examples, P = the
    number of b's weights, H = fc_units)."""

    #: u's task-level fast weights Q*: its conv weights and key layer, each in its shape.
    representation_fast: list[torch.Tensor]
    #: keys r'_i = u(Q, Q*, x'_i): [S, H].
    keys: torch.Tensor
    #: b's example-level fast weights W*_i, flattened in layer order: [S, P].
    memory: torch.Tensor
    n_way: int
