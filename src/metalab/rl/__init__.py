"""Meta-RL track: batched task families, MLP policies, MAML-RL / ANIL-RL / Reptile-RL.

Pure torch, vectorised over tasks and trajectories; see ``loop.train_rl`` and
``loop.evaluate_rl`` for the entry points and ``config.RLExperimentConfig`` for settings.
"""

from metalab.rl.config import RLExperimentConfig
from metalab.rl.learners import ANILRL, MAMLRL, NonFiniteLossError, ReptileRL
from metalab.rl.loop import RLTrainer, evaluate_rl, train_rl

__all__ = [
    "ANILRL",
    "MAMLRL",
    "NonFiniteLossError",
    "RLExperimentConfig",
    "RLTrainer",
    "ReptileRL",
    "evaluate_rl",
    "train_rl",
]
