"""MLP policies with an explicit body/head split and a functional, per-task forward.

Parameters are addressed by name (``body.*``, ``head.*``), so inner-loop adaptation is a
dict update, and ANIL adapts exactly the names under ``head.``. The forward used by
rollouts and losses takes *per-task* parameters (every tensor has a leading task
dimension ``T``) through ``torch.func.functional_call``; the layers accept such stacked
weights directly (one batched matmul over tasks), which is several times faster on CPU
than mapping the forward over tasks with ``vmap``. Shared meta-parameters are expanded
to ``T`` copies by :func:`stack_parameters`, which keeps gradients flowing back to them.
Gradients always go through ``functional_call`` (:func:`policy_outputs`); gradient-free
rollouts use :func:`sampling_outputs`, the same computation without module dispatch
(tested equal).

A policy is initialised on the CPU and then moved to its device, so its starting weights
are the same on every device; actions are drawn on the sampling generator's device (the
run's CPU generator) and moved to the policy's, so the random streams do not depend on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from metalab.rl.envs import MetaRLEnvironment


def task_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-task affine map: inputs [T, ..., in], weight [T, out, in], bias [T, out]."""
    num_tasks = weight.shape[0]
    flat = inputs.reshape(num_tasks, -1, inputs.shape[-1])
    outputs = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return outputs.reshape(*inputs.shape[:-1], outputs.shape[-1])


class TaskLinear(nn.Linear):
    """A linear layer whose weights may carry a leading task dimension.

    With ordinary weights it is ``nn.Linear``. With weight [T, out, in] and bias [T, out]
    (as substituted by ``functional_call``) it maps inputs [T, ..., in] to [T, ..., out],
    each task with its own weights.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return super().forward(inputs)
        return task_linear(inputs, self.weight, self.bias)


def _mlp_body(input_dim: int, hidden_size: int, hidden_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = input_dim
    for _ in range(hidden_layers):
        layers += [TaskLinear(width, hidden_size), nn.Tanh()]
        width = hidden_size
    return nn.Sequential(*layers)


def _gaussian_outputs(
    mean: torch.Tensor, log_std: torch.Tensor, min_log_std: float
) -> torch.Tensor:
    """Concatenate mean [(T,) ..., A] and a log-std [A] or per-task [T, A] broadcast to it.

    The log-std is clamped from below at ``min_log_std`` (as pytorch-maml-rl's Gaussian
    policy does, there log(1e-6)): an inner step may push it arbitrarily low, and a
    vanishing std makes the log-densities, and so the next step, blow up. Below the floor
    its gradient is 0.
    """
    log_std = log_std.clamp_min(min_log_std)
    if log_std.dim() == 2:
        log_std = log_std.reshape(log_std.shape[0], *([1] * (mean.dim() - 2)), -1)
    return torch.cat([mean, log_std.expand_as(mean)], dim=-1)


class GaussianHead(nn.Module):
    """Mean output layer plus a state-independent log standard deviation."""

    def __init__(
        self, hidden_size: int, action_dim: int, init_std: float, min_std: float = 1e-6
    ) -> None:
        super().__init__()
        if not 0.0 < min_std <= init_std:
            raise ValueError(f"min_std must be in (0, init_std={init_std}], got {min_std}")
        self.min_log_std = math.log(min_std)
        self.mean = TaskLinear(hidden_size, action_dim)
        # Built on the CPU like the layers beside it; `build_policy` moves the whole policy.
        self.log_std = nn.Parameter(
            torch.full((action_dim,), math.log(init_std), device=torch.device("cpu"))
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., hidden] -> [..., 2 * action_dim]: mean then log-std.

        A per-task log-std [T, A] goes with features [T, ..., hidden].
        """
        return _gaussian_outputs(self.mean(features), self.log_std, self.min_log_std)


class GaussianMLPPolicy(nn.Module):
    """Diagonal Gaussian policy: tanh MLP body, head = mean layer + log-std (floored at
    log(``min_std``))."""

    discrete = False

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden_size: int = 64,
        hidden_layers: int = 2,
        init_std: float = 1.0,
        min_std: float = 1e-6,
    ) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.body = _mlp_body(observation_dim, hidden_size, hidden_layers)
        self.head = GaussianHead(hidden_size, action_dim, init_std, min_std)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """observations [..., observation_dim] -> distribution outputs [..., 2 * action_dim]."""
        return self.head(self.body(observations))

    def log_prob(self, outputs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """outputs [..., 2A], actions float [..., A] -> log-density [...]."""
        mean, log_std = outputs.split(self.action_dim, dim=-1)
        z = (actions - mean) * torch.exp(-log_std)
        per_dim = -0.5 * z.pow(2) - log_std - 0.5 * math.log(2.0 * math.pi)
        return per_dim.sum(dim=-1)

    def sample(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """outputs [..., 2A] -> actions float [..., A] on the outputs' device."""
        mean, log_std = outputs.split(self.action_dim, dim=-1)
        # Drawn where the generator lives, so the noise is the same whichever device computes.
        noise = torch.randn(
            mean.shape, generator=generator, dtype=mean.dtype, device=generator.device
        )
        return mean + torch.exp(log_std) * noise.to(mean.device)


class CategoricalMLPPolicy(nn.Module):
    """Categorical policy over ``num_actions`` choices: tanh MLP body, head = logits layer."""

    discrete = True

    def __init__(
        self,
        observation_dim: int,
        num_actions: int,
        hidden_size: int = 64,
        hidden_layers: int = 2,
    ) -> None:
        super().__init__()
        self.body = _mlp_body(observation_dim, hidden_size, hidden_layers)
        self.head = TaskLinear(hidden_size, num_actions)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """observations [..., observation_dim] -> logits [..., num_actions]."""
        return self.head(self.body(observations))

    def log_prob(self, outputs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """logits [..., K], actions int64 [...] -> log-probability [...]."""
        log_probs = torch.log_softmax(outputs, dim=-1)
        return torch.gather(log_probs, -1, actions.unsqueeze(-1)).squeeze(-1)

    def sample(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """logits [..., K] -> actions int64 [...] on the logits' device."""
        probabilities = torch.softmax(outputs, dim=-1)
        flat = probabilities.reshape(-1, probabilities.shape[-1])
        # The draw runs on the generator's device (its stream, whichever device computes).
        drawn = torch.multinomial(flat.to(generator.device), 1, generator=generator)
        return drawn.to(outputs.device).reshape(probabilities.shape[:-1])


Policy = GaussianMLPPolicy | CategoricalMLPPolicy


def build_policy(
    env: MetaRLEnvironment,
    hidden_size: int = 64,
    hidden_layers: int = 2,
    init_std: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    min_std: float = 1e-6,
) -> Policy:
    """The policy family ``env`` needs, initialised from ``seed`` (global RNG untouched);
    ``init_std`` and ``min_std`` (the std floor) apply to the Gaussian one.

    The weights are drawn on the CPU and then moved to ``device``: the same start on every
    device.
    """
    # On the CPU whatever the default device: the seeded CPU stream draws the weights.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        if env.discrete_actions:
            policy: Policy = CategoricalMLPPolicy(
                env.observation_dim, env.action_dim, hidden_size, hidden_layers
            )
        else:
            policy = GaussianMLPPolicy(
                env.observation_dim, env.action_dim, hidden_size, hidden_layers, init_std, min_std
            )
    return policy.to(device=torch.device(device), dtype=dtype)


def head_parameter_names(policy: nn.Module) -> list[str]:
    """Names of the head's parameters (what ANIL adapts)."""
    return [name for name, _ in policy.named_parameters() if name.startswith("head.")]


def stack_parameters(
    parameters: dict[str, torch.Tensor], num_tasks: int
) -> dict[str, torch.Tensor]:
    """Expand each tensor to [num_tasks, *shape] (a view: gradients flow to the original)."""
    return {
        name: tensor.unsqueeze(0).expand(num_tasks, *tensor.shape)
        for name, tensor in parameters.items()
    }


def policy_outputs(
    policy: nn.Module, task_parameters: dict[str, torch.Tensor], observations: torch.Tensor
) -> torch.Tensor:
    """Per-task forward: parameters [T, ...] each, observations [T, ..., obs_dim].

    Returns the distribution outputs [T, ..., output_dim] (see the policy's ``forward``).
    """
    return functional_call(policy, task_parameters, (observations,))


def sampling_outputs(
    policy: nn.Module, task_parameters: dict[str, torch.Tensor], observations: torch.Tensor
) -> torch.Tensor:
    """Same values as :func:`policy_outputs`, computed without module dispatch.

    Rollouts call the policy once per environment step, where ``functional_call``'s
    per-call overhead is about half the cost; this walks the body and head directly.
    """
    hidden = observations
    for index, layer in enumerate(policy.body):
        if isinstance(layer, nn.Linear):
            prefix = f"body.{index}."
            hidden = task_linear(
                hidden, task_parameters[prefix + "weight"], task_parameters[prefix + "bias"]
            )
        else:
            hidden = layer(hidden)
    if isinstance(policy.head, GaussianHead):
        mean = task_linear(
            hidden, task_parameters["head.mean.weight"], task_parameters["head.mean.bias"]
        )
        return _gaussian_outputs(mean, task_parameters["head.log_std"], policy.head.min_log_std)
    return task_linear(hidden, task_parameters["head.weight"], task_parameters["head.bias"])
