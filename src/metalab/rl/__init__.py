"""Meta-RL track: batched task families, MLP policies, MAML-RL / ANIL-RL / Reptile-RL and
the joint policy-gradient reference.

Pure torch, vectorised over tasks and trajectories; see ``loop.train_rl`` and
``loop.evaluate_rl`` for the entry points and ``config.RLExperimentConfig`` for settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metalab.rl.config import RLExperimentConfig
    from metalab.rl.learners import (
        ANILRL,
        MAMLRL,
        JointPolicyGradient,
        NonFiniteLossError,
        ReptileRL,
    )
    from metalab.rl.loop import RLTrainer, evaluate_rl, train_rl

# Lazy exports: `metalab.rl.config` (the params.yaml schema) stays free of torch.
_EXPORTS = {
    "RLExperimentConfig": "metalab.rl.config",
    "ANILRL": "metalab.rl.learners",
    "JointPolicyGradient": "metalab.rl.learners",
    "MAMLRL": "metalab.rl.learners",
    "NonFiniteLossError": "metalab.rl.learners",
    "ReptileRL": "metalab.rl.learners",
    "RLTrainer": "metalab.rl.loop",
    "evaluate_rl": "metalab.rl.loop",
    "train_rl": "metalab.rl.loop",
}

__all__ = [
    "ANILRL",
    "JointPolicyGradient",
    "MAMLRL",
    "NonFiniteLossError",
    "RLExperimentConfig",
    "RLTrainer",
    "ReptileRL",
    "evaluate_rl",
    "train_rl",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'metalab.rl' has no attribute {name!r}")
