"""Algorithm name (``experiments.<name>.algorithm``) -> the module that implements it.

Modules are imported lazily: only an algorithm that params.yaml names is loaded, and this
module itself imports no torch. Each module defines ``Options`` (its params.yaml keys) and
``build(options, context)`` returning a `metalab.algorithms.base.MetaLearner`.

The seed project's designs carry their own names; the seed's names, which were those of
papers whose methods they are not, are refused with the new name (`renamed`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from metalab.schema import field_error

if TYPE_CHECKING:
    from metalab.algorithms.base import BuildContext, MetaLearner

ALGORITHMS: dict[str, str] = {
    # MAML, FOMAML, Meta-SGD, MAML++ and ANIL are options of one core.
    "maml": "metalab.algorithms.maml",
    "reptile": "metalab.algorithms.reptile",
    "cavia": "metalab.algorithms.cavia",
    "protonets": "metalab.algorithms.protonets",
    "generated_head": "metalab.algorithms.generated_head",
    "film_prototypes": "metalab.algorithms.film_prototypes",
    "leo": "metalab.algorithms.leo",
    "meta_networks": "metalab.algorithms.meta_networks",
    # TAML (Jamal & Qi): entropy / inequality terms on the MAML core.
    "taml": "metalab.algorithms.taml",
    "anil_task_encoder": "metalab.algorithms.anil_task_encoder",
}

# The seed project's names of its own designs -> what to write instead (and why).
RENAMED_ALGORITHMS: dict[str, str] = {
    "metanets": "renamed generated_head (the seed project's design; "
    "'meta_networks' is Munkhdalai & Yu's)",
    "metanets_embedding": "renamed film_prototypes (the seed project's "
    "'embedding-based Meta Networks')",
}
# Option keys, in every algorithm that had them.
RENAMED_OPTIONS: dict[str, str] = {
    "meta_dropout_rates": "renamed task_dropout_rates (the seed project's 'Meta Dropout'; "
    "Lee et al.'s is learned_noise)",
}
# (algorithm, option, value) -> the algorithm that value has become.
RENAMED_OPTION_VALUES: dict[tuple[str, str, str], str] = {
    ("taml", "variant", "encoder"): "now algorithm anil_task_encoder (the seed project's "
    "'TAML', ANIL with a task encoder; not Jamal & Qi's)",
}


def renamed(experiment: Any) -> tuple[tuple[str, ...], Any, str] | None:
    """Where a raw ``experiments.<name>`` entry (``algorithm``, ``options``; anything else
    is left to the schema) uses a name the project has retired: (the key's path below the
    experiment, the old value, the one-line reason naming the new name), or None."""
    if not isinstance(experiment, Mapping):
        return None
    algorithm, options = experiment.get("algorithm"), experiment.get("options")
    if isinstance(algorithm, str) and algorithm in RENAMED_ALGORITHMS:
        return ("algorithm",), algorithm, RENAMED_ALGORITHMS[algorithm]
    if not isinstance(options, Mapping):
        return None
    for key, reason in RENAMED_OPTIONS.items():
        if key in options:
            return ("options", key), options[key], reason
    for (owner, key, value), reason in RENAMED_OPTION_VALUES.items():
        if algorithm == owner and options.get(key) == value:
            return ("options", key), value, reason
    return None


def refuse_renamed(experiment: Any) -> Any:
    """``experiment`` (a raw ``experiments.<name>`` entry) unchanged, or the params error
    (`metalab.schema.field_error`: key, old value, new name) of its first retired name."""
    retired = renamed(experiment)
    if retired is not None:
        raise field_error(*retired)
    return experiment


def unknown_algorithm(algorithm: str) -> str:
    """Why ``algorithm`` is not in `ALGORITHMS`, in one line (with the new name if renamed)."""
    if algorithm in RENAMED_ALGORITHMS:
        return f"algorithm {algorithm!r}: {RENAMED_ALGORITHMS[algorithm]}"
    return f"unknown algorithm {algorithm!r}; allowed: {', '.join(sorted(ALGORITHMS))}"


def algorithm_module(algorithm: str) -> ModuleType:
    if algorithm not in ALGORITHMS:
        raise KeyError(unknown_algorithm(algorithm))
    return importlib.import_module(ALGORITHMS[algorithm])


def options_class(algorithm: str) -> type[BaseModel]:
    return algorithm_module(algorithm).Options


def build_learner(algorithm: str, options: BaseModel, context: BuildContext) -> MetaLearner:
    return algorithm_module(algorithm).build(options, context)
