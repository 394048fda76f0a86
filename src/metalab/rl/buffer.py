"""The meta-buffer: every task's pre- and post-adaptation trajectories of one iteration.

Sampling fills it without building any graph; the outer step then replays the stored
trajectories (observations, actions, rewards, dones, sampling log-probs) and their fixed
advantages through the differentiable inner loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metalab.rl.rollout import Trajectories


@dataclass(frozen=True)
class ScoredTrajectories:
    """Trajectories of T tasks plus their normalised advantages [T, N, L] (constants).

    ``return_scale`` [T] converts a task's mean undiscounted return into the units of the
    policy-gradient loss (1 / (advantage std * mean valid steps per trajectory)), so the
    DiCE estimator's return-weighted term matches the normalised-advantage term; None = 1.
    """

    trajectories: Trajectories
    advantages: torch.Tensor
    return_scale: torch.Tensor | None = None

    def task(self, index: int) -> ScoredTrajectories:
        scale = None if self.return_scale is None else self.return_scale[index : index + 1]
        return ScoredTrajectories(
            self.trajectories.task(index), self.advantages[index : index + 1], scale
        )

    def scaled_mean_returns(self) -> torch.Tensor:
        """Each task's mean undiscounted return times its ``return_scale``, [T]."""
        returns = self.trajectories.episode_returns().mean(dim=1)
        return returns if self.return_scale is None else returns * self.return_scale


@dataclass
class MetaBuffer:
    """``pre_adaptation[j]``: trajectories sampled before inner step j (j = 0 is the
    meta-policy); ``post_adaptation``: trajectories of the fully adapted policies."""

    pre_adaptation: list[ScoredTrajectories] = field(default_factory=list)
    post_adaptation: ScoredTrajectories | None = None

    @property
    def num_tasks(self) -> int:
        return self.pre_adaptation[0].trajectories.num_tasks

    def task(self, index: int) -> MetaBuffer:
        """The buffer of one task (task dimension kept, of size 1)."""
        post = None if self.post_adaptation is None else self.post_adaptation.task(index)
        return MetaBuffer([batch.task(index) for batch in self.pre_adaptation], post)

    def pre_adaptation_return(self) -> float:
        """Mean undiscounted return of the meta-policy's trajectories."""
        return float(self.pre_adaptation[0].trajectories.episode_returns().mean())

    def post_adaptation_return(self) -> float:
        """Mean undiscounted return of the adapted policies' trajectories."""
        if self.post_adaptation is None:
            raise ValueError("the buffer holds no post-adaptation trajectories")
        return float(self.post_adaptation.trajectories.episode_returns().mean())
