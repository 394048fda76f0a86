"""Algorithm name (``experiments.<name>.algorithm``) -> the module that implements it.

Modules are imported lazily: only an algorithm that params.yaml names is loaded, and this
module itself imports no torch. Each module defines ``Options`` (its params.yaml keys) and
``build(options, context)`` returning a `metalab.algorithms.base.MetaLearner`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from metalab.algorithms.base import BuildContext, MetaLearner

ALGORITHMS: dict[str, str] = {
    # MAML, FOMAML, Meta-SGD, MAML++ and ANIL are options of one core.
    "maml": "metalab.algorithms.maml",
    "reptile": "metalab.algorithms.reptile",
    "cavia": "metalab.algorithms.cavia",
    "protonets": "metalab.algorithms.protonets",
    "metanets": "metalab.algorithms.metanets",
    "metanets_embedding": "metalab.algorithms.metanets_embedding",
    "leo": "metalab.algorithms.leo",
    "meta_networks": "metalab.algorithms.meta_networks",
    # TAML: entropy / inequality terms on the MAML core, or the task-encoder variant.
    "taml": "metalab.algorithms.taml",
}


def algorithm_module(algorithm: str) -> ModuleType:
    if algorithm not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {algorithm!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
    return importlib.import_module(ALGORITHMS[algorithm])


def options_class(algorithm: str) -> type[BaseModel]:
    return algorithm_module(algorithm).Options


def build_learner(algorithm: str, options: BaseModel, context: BuildContext) -> MetaLearner:
    return algorithm_module(algorithm).build(options, context)
