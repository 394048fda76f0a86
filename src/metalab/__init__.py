"""metalab: reproducible meta-learning experiments on Omniglot and 2D navigation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_learner", "Learner"]

if TYPE_CHECKING:
    from metalab.learner_api import Learner, load_learner


def __getattr__(name: str) -> Any:
    # Lazy: `import metalab` (and every stage) stays free of torch until a learner is used.
    if name in ("load_learner", "Learner"):
        from metalab import learner_api

        return getattr(learner_api, name)
    raise AttributeError(f"module 'metalab' has no attribute {name!r}")
