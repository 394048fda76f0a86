"""Value baselines: the MAML paper's linear feature baseline and an MLP critic.

Both are fitted per task on the very batch whose advantages they serve (the task is only
visible through rewards, so a value function shared across tasks would be a poor
baseline). ``fit_predict`` returns values [T, N, L] (0 on masked steps) and the fit's
critic loss (0 for the linear baseline, which has no trainable state).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call

from metalab.rl.policies import TaskLinear, stack_parameters
from metalab.rl.rollout import Trajectories

# Time is fed to the baselines as step / 100, as in the MAML paper's code.
TIME_SCALE = 100.0


def baseline_features(trajectories: Trajectories) -> torch.Tensor:
    """Per-step features [T, N, L, 2 * obs_dim + 4]: obs, obs^2, t, t^2, t^3, 1 (masked)."""
    observations = trajectories.observations.clamp(-10.0, 10.0)
    time = (trajectories.timesteps / TIME_SCALE).unsqueeze(-1)
    features = torch.cat(
        [observations, observations.pow(2), time, time.pow(2), time.pow(3), torch.ones_like(time)],
        dim=-1,
    )
    return features * trajectories.mask.unsqueeze(-1)


def feature_dim(observation_dim: int) -> int:
    return 2 * observation_dim + 4


class Baseline(Protocol):
    def fit_predict(
        self, trajectories: Trajectories, returns: torch.Tensor, track_meta_gradient: bool
    ) -> tuple[torch.Tensor, float]: ...

    def step(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LinearFeatureBaseline:
    """Ridge regression of returns on :func:`baseline_features`, one solve per task.

    The ridge coefficient grows tenfold (up to 5 times) if the solve is not finite.
    """

    def __init__(self, regularization: float = 1e-5) -> None:
        self.regularization = regularization

    def fit_predict(
        self, trajectories: Trajectories, returns: torch.Tensor, track_meta_gradient: bool = False
    ) -> tuple[torch.Tensor, float]:
        """returns [T, N, L] -> fitted values [T, N, L], critic loss 0.0."""
        features = baseline_features(trajectories).to(torch.float64)
        num_tasks, num_features = features.shape[0], features.shape[-1]
        design = features.reshape(num_tasks, -1, num_features)
        targets = (returns * trajectories.mask).to(torch.float64).reshape(num_tasks, -1, 1)
        gram = design.transpose(1, 2) @ design
        moment = design.transpose(1, 2) @ targets
        identity = torch.eye(num_features, dtype=torch.float64, device=design.device)
        regularization = self.regularization
        for _ in range(5):
            weights = torch.linalg.solve(gram + regularization * identity, moment)
            if torch.isfinite(weights).all():
                break
            regularization *= 10.0
        values = (design @ weights).reshape(returns.shape).to(returns.dtype)
        return values * trajectories.mask, 0.0

    def step(self) -> None:
        """Nothing to train across batches."""

    def state_dict(self) -> dict:
        return {"regularization": self.regularization}

    def load_state_dict(self, state: dict) -> None:
        self.regularization = float(state["regularization"])


class MLPCriticBaseline:
    """An MLP value function, adapted to each task's batch from a meta-learned start.

    Per task, ``fit_steps`` Adam steps (rate ``fit_lr``) regress the task's returns,
    standardised per task, on :func:`baseline_features`. The starting weights are
    meta-trained first-order: the gradient of the post-fit loss at the fitted weights,
    averaged over tasks, accumulates in ``.grad`` and :meth:`step` applies it with Adam
    (rate ``meta_lr``). The reported critic loss is the mean post-fit squared error in
    standardised units.
    """

    def __init__(
        self,
        observation_dim: int,
        hidden_size: int = 64,
        fit_steps: int = 20,
        fit_lr: float = 0.01,
        meta_lr: float = 1e-3,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        # Drawn on the CPU (seeded stream, same start on every device), then moved.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            critic = nn.Sequential(
                TaskLinear(feature_dim(observation_dim), hidden_size),
                nn.Tanh(),
                TaskLinear(hidden_size, hidden_size),
                nn.Tanh(),
                TaskLinear(hidden_size, 1),
            )
        self.critic = critic.to(device=torch.device(device), dtype=dtype)
        self.fit_steps = fit_steps
        self.fit_lr = fit_lr
        # After the move: Adam keeps its moments beside the parameters it updates.
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=meta_lr)

    def _per_task_errors(
        self,
        parameters: dict[str, torch.Tensor],
        features: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error per task [T] and predictions [T, N, L]."""
        predictions = functional_call(self.critic, parameters, (features,)).squeeze(-1)
        count = mask.sum(dim=(1, 2)).clamp_min(1.0)
        errors = ((predictions - targets).pow(2) * mask).sum(dim=(1, 2)) / count
        return errors, predictions

    def fit_predict(
        self, trajectories: Trajectories, returns: torch.Tensor, track_meta_gradient: bool = False
    ) -> tuple[torch.Tensor, float]:
        """returns [T, N, L] -> fitted values [T, N, L], post-fit critic loss."""
        mask = trajectories.mask
        features = baseline_features(trajectories)
        count = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
        mean = (returns * mask).sum(dim=(1, 2), keepdim=True) / count
        std = (((returns - mean).pow(2) * mask).sum(dim=(1, 2), keepdim=True) / count).sqrt()
        std = std.clamp_min(1e-6)
        targets = (returns - mean) / std * mask

        with torch.enable_grad():
            start = stack_parameters(dict(self.critic.named_parameters()), mask.shape[0])
            # Adam offsets are constants, so gradients reach the start weights first-order.
            offsets = {name: torch.zeros_like(value) for name, value in start.items()}
            first_moments = {name: torch.zeros_like(value) for name, value in start.items()}
            second_moments = {name: torch.zeros_like(value) for name, value in start.items()}
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            for step in range(1, self.fit_steps + 1):
                current = {
                    name: (start[name].detach() + offsets[name]).requires_grad_(True)
                    for name in start
                }
                errors, _ = self._per_task_errors(current, features, targets, mask)
                gradients = torch.autograd.grad(errors.sum(), list(current.values()))
                for name, gradient in zip(current, gradients, strict=True):
                    first_moments[name] = beta1 * first_moments[name] + (1 - beta1) * gradient
                    second_moments[name] = beta2 * second_moments[name] + (1 - beta2) * gradient**2
                    corrected_first = first_moments[name] / (1 - beta1**step)
                    corrected_second = second_moments[name] / (1 - beta2**step)
                    offsets[name] = offsets[name] - self.fit_lr * corrected_first / (
                        corrected_second.sqrt() + eps
                    )
            fitted = {name: start[name] + offsets[name] for name in start}
            errors, predictions = self._per_task_errors(fitted, features, targets, mask)
            if track_meta_gradient:
                errors.mean().backward()
        values = (predictions.detach() * std + mean) * mask
        return values, float(errors.mean().detach())

    def step(self) -> None:
        """Apply the accumulated meta-gradient of the starting weights."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Critic weights and Adam state (live tensors on the critic's device)."""
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from tensors on any device: they are copied to the critic's device."""
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_baseline(
    kind: str,
    observation_dim: int,
    regularization: float = 1e-5,
    hidden_size: int = 64,
    fit_steps: int = 20,
    fit_lr: float = 0.01,
    meta_lr: float = 1e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Baseline:
    """A ``"linear"`` or ``"mlp"`` baseline; an MLP critic lives on ``device`` (the linear
    fit computes wherever the trajectories are)."""
    if kind == "linear":
        return LinearFeatureBaseline(regularization)
    if kind == "mlp":
        return MLPCriticBaseline(
            observation_dim,
            hidden_size,
            fit_steps,
            fit_lr,
            meta_lr,
            seed=seed,
            dtype=dtype,
            device=device,
        )
    raise ValueError(f"unknown baseline {kind!r}")
