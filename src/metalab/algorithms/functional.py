"""Functional building blocks of the MAML family: networks as functions of a parameter dict.

Two ways of evaluating a Conv4 for a batch of tasks, which must agree exactly:

* `module_features` runs the `nn.Module` itself (``torch.func.functional_call``) for one
  task. It is the plain reference the per-task loop uses.
* `conv4_grouped_features` runs ``T`` tasks with *different* weights in one call: the task
  dimension is folded into the channel dimension, ``[B, T*C, H, W]``, so that each
  convolution is a grouped convolution (``groups=T``, weights stacked ``[T*out, in, 3, 3]``)
  and each BatchNorm is an ordinary BatchNorm over ``T*C`` channels. BatchNorm statistics
  are per channel, hence per task: one task's statistics never mix with another's.

Where the time goes on a CPU is memory traffic over the first block's activations (28x28
x 64 channels per image), so the grouped path computes the same function with fewer
passes over them (all exact; the tests compare it with the module in float64):
the first block's BatchNorm is folded into its convolution using the statistics of the
one-channel image patches (`_first_block_folded`), max-pooling runs before the ReLU, and
channels-last layout keeps pooling and BatchNorm on their fast kernels.

Stacked parameters carry a leading task dimension: ``params[name]`` is ``[T, *shape]``.
At inner step 0 all tasks share the meta-parameters, so `stack_for_tasks` *expands* them
(a view): the gradient of a sum of per-task losses with respect to the expanded tensor is
the per-task gradient, and backpropagation through the expand sums the tasks' outer
gradients into the shared meta-parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.precision import full_precision
from metalab.models.conv4 import Conv4

# MAML++ keeps every non-final step's loss weight above this fraction of 1/K.
MULTI_STEP_MIN_WEIGHT_FRACTION = 0.03
ParameterDict = dict[str, Tensor]


def inner_loop(
    params: ParameterDict,
    adapted_names: Sequence[str],
    support_loss: Callable[[ParameterDict, int], Tensor],
    inner_lr: Callable[[str, int], Tensor | float],
    steps: int,
    second_order: bool,
) -> list[ParameterDict]:
    """Gradient descent on the support loss: theta_{k+1} = theta_k - lr_k * grad L_support(theta_k).

    ``params`` is theta_0 (meta-parameters, possibly stacked per task); only the entries named
    in ``adapted_names`` move. ``support_loss(params, step)`` must return the *sum over tasks*
    of each task's support loss, so that the gradient with respect to a stacked tensor is the
    per-task gradient. With ``second_order`` the gradient steps stay in the autograd graph
    (MAML); without it they are constants (first-order MAML: the meta-gradient is then the
    query gradient at the adapted weights). Returns [theta_0, ..., theta_steps].
    """
    trajectory = [params]
    for step in range(steps):
        loss = support_loss(params, step)
        grads = torch.autograd.grad(
            loss, [params[name] for name in adapted_names], create_graph=second_order
        )
        params = dict(params)
        for name, grad in zip(adapted_names, grads, strict=True):
            params[name] = params[name] - inner_lr(name, step) * grad
        trajectory.append(params)
    return trajectory


def zero_head(n_way: int, like: Tensor) -> ParameterDict:
    """A fresh zero-initialised N-way linear head shaped after the head weight ``like``
    [N', F]: ``head.weight`` [N, F] and ``head.bias`` [N], on its device and dtype."""
    options = {"dtype": like.dtype, "device": like.device}
    return {
        "head.weight": torch.zeros(n_way, like.shape[1], **options),
        "head.bias": torch.zeros(n_way, **options),
    }


def adaptation_start(
    params: ParameterDict, adapted_names: Sequence[str], n_way: int, trained_n_way: int
) -> ParameterDict:
    """theta_0 of test-time adaptation to N-way tasks: ``params`` (with ``head.*``)
    detached, the entries named in ``adapted_names`` requiring grad; for N other than
    ``trained_n_way``, a fresh zero N-way head (`zero_head`) instead of the trained one."""
    start = {name: p.detach().requires_grad_(name in adapted_names) for name, p in params.items()}
    if n_way != trained_n_way:
        fresh = zero_head(n_way, params["head.weight"])
        start.update({name: p.requires_grad_(name in adapted_names) for name, p in fresh.items()})
    return start


def adaptation_lr(
    inner_lr: Callable[[str, int], Tensor | float], n_way: int, trained_n_way: int
) -> Callable[[str, int], Tensor | float]:
    """``inner_lr(name, step)`` for test-time adaptation: learned lrs detached, and for a
    fresh head (N other than ``trained_n_way``) Meta-SGD's per-class head lrs [N', ...]
    averaged over the classes."""

    def lr(name: str, step: int) -> Tensor | float:
        value = inner_lr(name, step)
        if isinstance(value, Tensor):
            value = value.detach()
            if value.dim() > 0 and name.startswith("head.") and n_way != trained_n_way:
                value = value.mean(dim=0)
        return value

    return lr


def multi_step_loss_weights(num_steps: int, iteration: int, anneal_iterations: int) -> Tensor:
    """MAML++ importance of the query loss after each inner step, float64 [num_steps] on
    the CPU whatever the learner's device (`weighted_query_losses` reads them as floats).

    Starts uniform (1/K each); the non-final weights decay linearly to a floor of
    0.03/K over ``anneal_iterations`` while the final step takes the rest, so the weights
    always sum to 1. From ``anneal_iterations`` on, only the final step counts.
    """
    weights = torch.zeros(num_steps, dtype=torch.float64, device="cpu")
    if num_steps == 1 or iteration >= anneal_iterations:
        weights[-1] = 1.0
        return weights
    uniform = 1.0 / num_steps
    decay = uniform * (1.0 - iteration / anneal_iterations)
    weights[:-1] = max(decay, MULTI_STEP_MIN_WEIGHT_FRACTION * uniform)
    weights[-1] = 1.0 - weights[:-1].sum()
    return weights


def weighted_query_losses(
    trajectory: Sequence[ParameterDict],
    query_logits: Callable[[ParameterDict, int], Tensor],
    query_y: Tensor,
    step_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The meta-loss of T tasks along their inner-loop trajectory [theta_0, ..., theta_K]:
    sum_k w_k L_Q(theta_k), k = 1..K, with ``step_weights`` float64 [K] (MAML++'s
    multi-step loss; one-hot on the last step otherwise, which is then the only query pass).

    ``query_logits(params, step)`` -> [T, Q, N]; query_y int64 [T, Q]. Returns the
    meta-losses [T], and the query logits [T, Q, N] and losses [T] after the last step.
    """
    weighted_losses = []
    for step, weight in enumerate(step_weights.tolist(), start=1):
        if weight == 0.0 and step < len(trajectory) - 1:
            continue
        logits = query_logits(trajectory[step], step)
        losses = per_task_cross_entropy(logits, query_y)
        weighted_losses.append(weight * losses)
    return torch.stack(weighted_losses).sum(dim=0), logits, losses


def per_task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each task. logits [T, B, N], labels int64 [T, B] -> [T]."""
    num_tasks, batch = labels.shape
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(num_tasks, batch).mean(dim=1)


def per_task_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct predictions of each task. logits [T, B, N], labels [T, B] -> [T]."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=1)


def stack_for_tasks(params: ParameterDict, num_tasks: int) -> ParameterDict:
    """Each tensor [*shape] -> an expanded view [num_tasks, *shape] (no copy)."""
    return {name: p.unsqueeze(0).expand(num_tasks, *p.shape) for name, p in params.items()}


def batchnorm_parameter_names(model: nn.Module) -> list[str]:
    """Names of the affine parameters of every BatchNorm layer of ``model``."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            names += [f"{module_name}.weight", f"{module_name}.bias"]
    return names


def use_batch_statistics(model: nn.Module) -> None:
    """Make every BatchNorm normalise with the statistics of the batch it sees, in train and
    eval mode alike, and drop running statistics (MAML's transductive BatchNorm)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None


class _FeatureView(nn.Module):
    """Exposes ``model.features`` as ``forward`` so that `functional_call` can run it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, dropout_masks: list[Tensor | None] | None) -> Tensor:
        if dropout_masks is None:
            return self.model.features(x)
        return self.model.features(x, dropout_masks)


def module_features(
    model: nn.Module,
    params: ParameterDict,
    x: Tensor,
    dropout_masks: list[Tensor | None] | None = None,
) -> Tensor:
    """``model.features(x)`` with the ``body.*`` entries of ``params`` as weights.

    x float [B, C, H, W] -> [B, feature_dim]. Missing entries fall back to the module's own.
    """
    body_params = {f"model.{name}": p for name, p in params.items() if name.startswith("body.")}
    return functional_call(_FeatureView(model), body_params, (x, dropout_masks))


def conv4_grouped_features(
    model: Conv4,
    params: ParameterDict,
    x: Tensor,
    dropout_masks: list[Tensor | None] | None = None,
    channels_last: bool = False,
    twice_differentiable: bool = False,
) -> Tensor:
    """Conv4 body features of T tasks at once, each task with its own weights.

    x float [T, B, C, H, W]; ``params["body.<i>.<j>.<weight|bias>"]`` stacked [T, *shape];
    ``dropout_masks``: per block [T, C', H', W'] or None. Returns [T, B, feature_dim], equal
    to running ``model.features`` task by task (BatchNorm statistics per task).
    ``twice_differentiable``: the result will be differentiated twice (a second-order
    support pass); selects the BatchNorm implementation that is fastest for that.
    """
    num_tasks, batch = x.shape[:2]
    h = None
    for index, block in enumerate(model.body):
        conv, norm = block[0], block[1]
        block_params = [
            params[f"body.{index}.{j}.{kind}"] for j in (0, 1) for kind in ("weight", "bias")
        ]
        if index == 0 and x.shape[2] == 1:
            h = _first_block_folded(x, *block_params, conv, norm.eps)
            if not channels_last:
                h = h.contiguous()
        else:
            if h is None:
                # [T, B, C, H, W] -> [B, T*C, H, W]: channel index t*C + c.
                h = x.transpose(0, 1).reshape(batch, num_tasks * x.shape[2], *x.shape[3:])
                if channels_last:
                    h = h.contiguous(memory_format=torch.channels_last)
            h = _grouped_conv_batch_norm(
                h, *block_params, conv, norm.eps, num_tasks, twice_differentiable
            )
        if isinstance(block[-1], nn.MaxPool2d):
            # max-pooling commutes with ReLU (ReLU is monotone): pooling first runs the ReLU,
            # forward and backward, on a quarter of the elements. Same values and gradients.
            h = F.max_pool2d(h, 2)
        h = F.relu(h)
        if dropout_masks is not None and dropout_masks[index] is not None:
            mask = dropout_masks[index]
            h = h * mask.reshape(1, -1, *mask.shape[2:]).to(h.dtype)
    channels = h.shape[1] // num_tasks
    features = h.reshape(batch, num_tasks, channels * h.shape[2] * h.shape[3])
    return features.transpose(0, 1)


def _grouped_conv_batch_norm(
    h: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    conv: nn.Conv2d,
    eps: float,
    num_tasks: int,
    twice_differentiable: bool,
) -> Tensor:
    """Convolution + training-mode BatchNorm of T tasks: h [B, T*C_in, H, W], stacked
    parameters [T, ...] -> [B, T*C_out, H', W']."""
    h = F.conv2d(
        h,
        conv_weight.reshape(-1, *conv_weight.shape[2:]),
        conv_bias.reshape(-1),
        stride=conv.stride,
        padding=conv.padding,
        groups=num_tasks,
    )
    # Per-channel batch statistics over (B, H, W) = per task, per channel.
    normalise = batch_norm_twice_differentiable if twice_differentiable else _native_batch_norm
    return normalise(h, norm_weight.reshape(-1), norm_bias.reshape(-1), eps)


def _first_block_folded(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    conv: nn.Conv2d,
    eps: float,
) -> Tensor:
    """BatchNorm(conv(x)) of T tasks for one-channel images, as one matrix product.

    The convolution is linear in the image patches p (3x3 = 9 values), so its output
    statistics follow from the patches' mean m and covariance S: mean = w.m + b and
    var = w S w^T per output channel. BatchNorm is then folded into the weights
    (w * scale, shifted bias), and one GEMM with block-diagonal per-task weights writes the
    normalised output straight into channels-last layout. This skips the BatchNorm passes
    over the largest activation of the network, forward and backward, and the slow
    one-input-channel grouped convolution. x float [T, B, 1, H, W] -> [B, T*C, H', W'].
    """
    num_tasks, batch = x.shape[:2]
    kernel = conv_weight.shape[2] * conv_weight.shape[3] * conv_weight.shape[4]
    images = x.transpose(0, 1).reshape(batch, num_tasks, *x.shape[3:])
    patches = F.unfold(images, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    positions = patches.shape[-1]  # [B, T*9, L] -> [B*L, T, 9]
    patches = patches.transpose(1, 2).reshape(batch * positions, num_tasks, kernel)
    weight = conv_weight.reshape(num_tasks, -1, kernel)  # [T, C, 9]
    with full_precision(x.device.type):  # statistics in full precision
        patches_full = patches.to(weight.dtype)
        patch_mean = patches_full.mean(dim=0)  # [T, 9]
        centred = patches_full - patch_mean
        patch_covariance = torch.einsum("ntk,ntl->tkl", centred, centred) / centred.shape[0]
        mean = torch.einsum("tck,tk->tc", weight, patch_mean) + conv_bias
        var = torch.einsum("tck,tkl,tcl->tc", weight, patch_covariance, weight)
        scale = norm_weight * torch.rsqrt(var + eps)
        folded_weight = weight * scale.unsqueeze(2)
        # (conv_bias - mean) keeps the conv bias in the graph, with its true gradient 0.
        folded_bias = norm_bias + (conv_bias - mean) * scale
    # The bias rides along as a last weight row against a column of ones: addmm would first
    # copy the broadcast bias into the (large) output, and its backward would sum it again.
    block_weight = torch.cat(
        [torch.block_diag(*folded_weight.transpose(1, 2)), folded_bias.reshape(1, -1)]
    )  # [T*9 + 1, T*C]
    ones = torch.ones(batch * positions, 1, dtype=patches.dtype, device=patches.device)
    out = torch.cat([patches.reshape(batch * positions, -1), ones], dim=1) @ block_weight
    height = (x.shape[3] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    width = (x.shape[4] + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
    # [B*L, T*C] is [B, H', W', T*C]: a channels-last [B, T*C, H', W'] without a copy.
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def _native_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def batch_norm_twice_differentiable(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Training-mode BatchNorm over dims (0, 2, 3) written with plain tensor ops.

    x [B, C, H, W], weight/bias [C]. Same values as ``F.batch_norm(training=True)``; its
    double backward is composed of elementary derivatives, which on CPU is about 3x faster
    than the native BatchNorm double backward for channels-last inputs (single backward is
    the other way round, so the native kernel is used everywhere else).
    """
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    scale = weight * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def linear_per_task(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A different linear head per task: features [T, B, F], weight [T, N, F], bias [T, N]
    -> logits [T, B, N]."""
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


class StackedOptimizer:
    """Adam or SGD on stacked per-task parameters, as ``torch.optim`` steps them.

    ``params[name]`` is [T, *shape], row t task t's weights; every operation is elementwise,
    so each task has its own Adam moments and moves exactly as a ``torch.optim.Adam`` (or
    ``SGD``, no momentum) of its own would (the same formulas, in the same order, as their
    single-tensor CPU implementation; every task takes the same steps). `step` updates the
    tensors in place, outside autograd.
    """

    def __init__(
        self,
        kind: str,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"inner optimizer {kind!r}: allowed 'adam', 'sgd'")
        self.kind, self.lr, self.betas, self.eps = kind, lr, betas, eps
        self.steps = 0
        self.moments: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def step(self, params: ParameterDict, grads: ParameterDict) -> None:
        """One step of every ``params[name]`` [T, ...] along ``grads[name]`` (same shape)."""
        if self.kind == "sgd":
            for name, grad in grads.items():
                params[name].add_(grad, alpha=-self.lr)
            return
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.steps)
        correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        for name, grad in grads.items():
            if name not in self.moments:
                self.moments[name] = (torch.zeros_like(grad), torch.zeros_like(grad))
            average, square_average = self.moments[name]
            average.lerp_(grad, 1 - beta1)
            square_average.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (square_average.sqrt() / correction2_sqrt).add_(self.eps)
            params[name].addcdiv_(average, denominator, value=-step_size)
