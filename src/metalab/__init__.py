"""metalab: reproducible meta-learning experiments on Omniglot and 2D navigation."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_learner", "Learner"]

if TYPE_CHECKING:
    from metalab.learner_api import Learner, load_learner

# Lazy: `import metalab` (and every stage) stays free of torch until a learner is used.
_EXPORTS = {"load_learner": "metalab.learner_api", "Learner": "metalab.learner_api"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'metalab' has no attribute {name!r}")
