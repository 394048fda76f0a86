"""Meta Dropout as Lee, Nam, Yang & Hwang (ICLR 2020) define it: learned, input-dependent
noise on the latent features of the *support* forward passes of the MAML inner loop.

The seed project's "Meta Dropout" (``task_dropout_rates``: one fixed-rate Bernoulli mask
per task, on support and query) is a different method; this module is the paper's.

Parameterisation (Conv4, block l = conv -> BatchNorm -> ReLU [-> MaxPool]; h^{l-1} is the
block's input, itself perturbed by the blocks below):

    mu^l = conv_{theta^l}(h^{l-1})                 the main network's pre-BatchNorm output
    a^l  = conv_{phi^l}(h^{l-1}) + eps^l,  eps^l ~ N(0, I)    a^l ~ N(conv_phi(h), I)
    z^l  = softplus(a^l)                           positive multiplicative noise
    h^l  = [MaxPool] ReLU(BatchNorm(mu^l * z^l))

with phi^l a convolution shaped like the block's own (its own weights, not adapted), and on
the logits an additive Gaussian with input-dependent scale shared by the classes,

    logits = head_theta(f) + softplus(w_phi . f + b_phi) * eps_out,   eps_out ~ N(0, I),

where f are the (perturbed) body features. That is the paper's Sec. 3 noise form (a
Gaussian with input-dependent mean and fixed unit variance, through a softplus, multiplying
the pre-activation of every layer) with the placement and the last-layer noise of the
authors' code (github.com/haebeom-lee/metadrop: layers.py ``conv_block`` / ``dense_block``).

Where the noise acts (the paper's meta-objective): the inner loop minimises the *expected*
support loss E_{z ~ p(z|x; phi)}[L(D_support; theta, z)], estimated with S Monte Carlo
draws (S = ``learned_noise_train_samples``, the paper's 1, in meta-training; S =
``learned_noise_test_samples``, the paper's 30, at meta-test): each inner step descends the
mean of the S samples' support losses. The query forward is noise-free, and phi is a
meta-parameter only: never adapted, it reaches the meta-loss through the inner-loop
gradients, so it needs second-order MAML (first-order drops exactly that path: phi's
meta-gradient is identically zero, which `metalab.algorithms.maml.Options` rejects).

What is averaged at test time is therefore the *support loss* inside each inner step (one
adapted model per task), not the predictions of S adapted models: that is what the
authors' code does (``n_test_mc_samp`` samples averaged in ``inner_loss``).

Randomness: every task draws one seed from torch's global CPU generator (in task order,
before its tasks are split into chunks); its noise then comes from a CPU generator of its
own, in the order (inner step, sample, block, logits), and is moved to the model's device.
The numbers are therefore the same on the per-task loop and the vectorised path, on any
device, and whatever thread a chunk runs on.

Deviations from the paper / the authors' code:

* Query passes run the plain network. The authors' code sends query images through the
  generator at its mean (eps = 0: features times softplus(conv_phi(h)), logits without
  noise); here the generator only ever touches support passes.
* Conv4 only (the paper's networks); ResNet18, ``anil_task_encoder`` (own head loop) and
  the seed's ``task_dropout_rates`` are rejected with it. Extensions the paper does not cover: ANIL
  (the fixed body still gets perturbed support features, recomputed at every inner step
  because the noise is redrawn), MAML++ per-step BatchNorm, multi-step loss, bf16.
* MAML++ derivative-order annealing: in its first-order iterations phi gets no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from metalab.algorithms.functional import ParameterDict, linear_per_task, per_task_cross_entropy
from metalab.algorithms.precision import autocast
from metalab.algorithms.task_forward import TaskForward
from metalab.models import Conv4

# The authors' initialisation of phi: N(0, 0.02^2) weights, zero biases.
INIT_STD = 0.02
# Per-task seeds are drawn below this bound (any int64 seed works for torch.Generator).
SEED_BOUND = 2**62


class LearnedNoiseOptions(BaseModel):
    """The ``learned_noise*`` options of the MAML core (`metalab.algorithms.maml.Options`
    derives from this; its ``first_order`` and ``task_dropout_rates`` are checked here)."""

    # False for a learner whose own inner loop draws no noise (anil_task_encoder).
    learned_noise_supported: ClassVar[bool] = True

    learned_noise: bool = Field(
        False,
        description=(
            "Meta Dropout of Lee et al. 2020 (Conv4): learned input-dependent noise on the "
            "support forward passes, meta-learned through the inner loop (learned_noise.py)"
        ),
    )
    learned_noise_train_samples: int = Field(
        1, ge=1, le=100, description="learned_noise: noise draws averaged per inner step (train)"
    )
    learned_noise_test_samples: int = Field(
        30, ge=1, le=1000, description="learned_noise: noise draws averaged per step (test)"
    )

    @model_validator(mode="after")
    def _learned_noise_consistent(self) -> LearnedNoiseOptions:
        if self.learned_noise and getattr(self, "first_order", False):
            raise ValueError(
                "learned_noise needs first_order: false (first-order MAML gives the noise "
                "generator no meta-gradient)"
            )
        if self.learned_noise and getattr(self, "task_dropout_rates", None) is not None:
            raise ValueError("learned_noise and task_dropout_rates: choose one of the two")
        if self.learned_noise and not self.learned_noise_supported:
            raise ValueError("learned_noise: not for anil_task_encoder (own head loop)")
        return self


class NoiseGenerator(nn.Module):
    """phi: one convolution per Conv4 block, shaped like that block's convolution, and a
    linear map of the body features to one logit-noise scale (``head``, [1, F])."""

    def __init__(self, model: Conv4) -> None:
        super().__init__()
        if not isinstance(model, Conv4):
            raise ValueError("learned_noise needs the conv4 model")
        convs = [block[0] for block in model.body]
        self.convs = nn.ModuleList(
            nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
            )
            for conv in convs
        )
        self.head = nn.Linear(model.feature_dim, 1)
        for module in [*self.convs, self.head]:
            nn.init.normal_(module.weight, std=INIT_STD)
            nn.init.zeros_(module.bias)

    @classmethod
    def build(cls, model: nn.Module, options: LearnedNoiseOptions) -> NoiseGenerator | None:
        """phi for ``model`` with ``learned_noise`` on, else None (no parameter, no draw)."""
        return cls(model) if options.learned_noise else None


def task_seeds(generator: NoiseGenerator | None, num_tasks: int) -> list[int] | None:
    """One noise seed per task from torch's global CPU generator, in task order; None
    (nothing drawn) without a noise generator."""
    if generator is None:
        return None
    return torch.randint(0, SEED_BOUND, (num_tasks,), dtype=torch.int64, device="cpu").tolist()


class SupportNoise:
    """The noisy support loss of a chunk of T tasks (``seeds[t]``: task t's noise seed).

    ``samples``: Monte Carlo draws averaged per inner step. Each call of `support_loss`
    draws fresh noise (the paper resamples z at every inner step)."""

    def __init__(self, generator: NoiseGenerator, seeds: Sequence[int], samples: int) -> None:
        self.generator = generator
        self.samples = samples
        self.task_generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def _normal(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """N(0, 1) noise: ``shape`` = [B, *rest] per task, stacked [B, T, *rest] (tasks on
        dim 1), task t's from its own generator."""
        draws = [torch.randn(tuple(shape), generator=g, device="cpu") for g in self.task_generators]
        return torch.stack(draws, dim=1).to(device=like.device, dtype=like.dtype)

    def support_loss(
        self, forward: TaskForward, params: ParameterDict, step: int, support_y: Tensor
    ) -> Tensor:
        """Mean over ``samples`` noise draws of the sum over the T tasks of each task's
        support cross-entropy (support_y [T, S]), at inner step ``step``: a scalar."""
        params = forward.step_parameters(params, step)
        x = forward.inputs["support"]
        losses = []
        for _ in range(self.samples):
            with autocast(forward.precision, x.device.type):
                logits = noisy_logits(forward.model, self.generator, params, x, self._normal)
            losses.append(per_task_cross_entropy(logits.to(forward.dtype), support_y).sum())
        return torch.stack(losses).mean()


def support_noise(
    generator: NoiseGenerator | None, seeds: Sequence[int] | None, samples: int
) -> SupportNoise | None:
    """The learned support noise of a chunk of tasks (``seeds[t]``: task t's), averaging
    ``samples`` draws per inner step; None without a generator (option off) or seeds."""
    if generator is None or seeds is None:
        return None
    return SupportNoise(generator, seeds, samples)


def _stacked(params: ParameterDict, model: nn.Module, name: str, num_tasks: int) -> Tensor:
    """``params[name]`` as [T, *shape]: stacked entries as they are, unstacked ones (the
    loop path, T = 1) and missing ones (ANIL's body: the model's own) expanded."""
    own = dict(model.named_parameters())[name]
    value = params.get(name, own)
    if value.dim() == own.dim():
        value = value.unsqueeze(0).expand(num_tasks, *value.shape)
    return value


def noisy_logits(
    model: Conv4,
    generator: NoiseGenerator,
    params: ParameterDict,
    x: Tensor,
    normal: Callable[[Sequence[int], Tensor], Tensor],
) -> Tensor:
    """Logits [T, B, N] of T tasks' images x [T, B, C, H, W] with the learned noise.

    ``params``: the main network's weights (stacked [T, ...] or not; missing body entries
    are the model's own); ``normal([B, *rest], like)`` -> N(0, 1) noise [B, T, *rest]. All tasks
    run at once: the main convolutions grouped per task, phi's shared by all."""
    num_tasks, batch = x.shape[:2]
    # [B, T*C, H, W], channel t*C + c: the grouped-convolution layout of `functional`.
    h = x.transpose(0, 1).reshape(batch, num_tasks * x.shape[2], *x.shape[3:])
    for index, block in enumerate(model.body):
        conv, norm = block[0], block[1]
        weight, bias, norm_weight, norm_bias = (
            _stacked(params, model, f"body.{index}.{j}.{kind}", num_tasks)
            for j in (0, 1)
            for kind in ("weight", "bias")
        )
        mu = F.conv2d(
            h,
            weight.reshape(-1, *weight.shape[2:]),
            bias.reshape(-1),
            stride=conv.stride,
            padding=conv.padding,
            groups=num_tasks,
        )
        # phi's convolution is shared: run it on [B*T, C, H, W] (task t of image b at b*T+t).
        noise_conv = generator.convs[index]
        per_image = h.reshape(batch * num_tasks, -1, *h.shape[2:])
        mean = noise_conv(per_image).reshape(batch, num_tasks, -1, *mu.shape[2:])
        z = F.softplus(mean + normal((batch, *mean.shape[2:]), mean))
        h = mu * z.reshape(mu.shape)
        h = F.batch_norm(
            h, None, None, norm_weight.reshape(-1), norm_bias.reshape(-1), True, 0.0, norm.eps
        )
        h = F.relu(h)
        if isinstance(block[-1], nn.MaxPool2d):
            h = F.max_pool2d(h, 2)
    channels = h.shape[1] // num_tasks
    features = h.reshape(batch, num_tasks, channels * h.shape[2] * h.shape[3]).transpose(0, 1)
    head_weight = _stacked(params, model, "head.weight", num_tasks)
    head_bias = _stacked(params, model, "head.bias", num_tasks)
    logits = linear_per_task(features, head_weight, head_bias)  # [T, B, N]
    scale = F.softplus(generator.head(features))  # [T, B, 1], shared by the classes
    return logits + scale * normal((batch, logits.shape[2]), logits).transpose(0, 1)
