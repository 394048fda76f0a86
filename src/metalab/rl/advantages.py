"""Discounted returns, GAE(gamma, lambda) and advantage normalisation.

All functions work on [..., L] tensors whose last dimension is time. ``dones[..., t]`` is
True when the trajectory ends at step t: nothing after it is bootstrapped into step t, and
the value after the last step is taken as 0 (trajectories end by termination or horizon).
"""

from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go R_t = r_t + gamma * (1 - done_t) * R_{t+1}; shapes [..., L]."""
    continues = 1.0 - dones.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * continues[..., t] * running
        returns[..., t] = running
    return returns


def generalized_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """GAE: A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}.

    delta_t = r_t + gamma * (1 - done_t) * V_{t+1} - V_t, with V_L = 0. rewards, values,
    dones: [..., L]; returns advantages [..., L].
    """
    continues = 1.0 - dones.to(rewards.dtype)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = rewards + gamma * continues * next_values - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = deltas[..., t] + gamma * gae_lambda * continues[..., t] * running
        advantages[..., t] = running
    return advantages


def advantage_std(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-task standard deviation over valid steps, [T, 1, 1]; advantages, mask [T, N, L]."""
    count = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    mean = (advantages * mask).sum(dim=(1, 2), keepdim=True) / count
    return (((advantages - mean).pow(2) * mask).sum(dim=(1, 2), keepdim=True) / count).sqrt()


def normalize_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 1e-8
) -> torch.Tensor:
    """Zero mean, unit std per task over its valid steps; advantages, mask [T, N, L].

    Masked steps come out as 0.
    """
    count = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    mean = (advantages * mask).sum(dim=(1, 2), keepdim=True) / count
    return (advantages - mean) / (advantage_std(advantages, mask) + epsilon) * mask
