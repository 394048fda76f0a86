"""Which meta-parameters the outer optimizer updates, and at what lr (MAML-family options).

Every meta-parameter falls in a section by its name: ``head`` (``head.*``), ``inner_lr``
(``inner_lr.*``), ``body_batchnorm`` (BatchNorm affine parameters and their per-step
offsets), ``body`` (the rest), or a learner's own section (e.g. ``task_encoder``), which
is trained like the head. Three options then decide the optimizer groups:

* ``outer_trainable``: ``all``, ``head_and_batchnorm`` or ``head`` (plus ``inner_lr`` and
  the learner's own sections, always trained);
* ``outer_lr_multipliers``: the first pattern matching a name sets its lr multiplier
  (0 freezes it);
* ``body_warmup_iterations``: the body (BatchNorm included) has lr 0 before this.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

# Trained under every ``outer_trainable`` setting.
ALWAYS_TRAINED_SECTIONS = ("head", "inner_lr")


class LrMultiplier(BaseModel):
    """One entry of ``outer_lr_multipliers``: parameters whose name matches ``pattern``."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="regular expression, re.search on the parameter name")
    multiplier: float = Field(ge=0, le=1000, description="outer lr = meta_lr x multiplier")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a regular expression: {pattern!r} ({error})") from error
        return pattern


class OuterGroupOptions(Protocol):
    """The options the policy reads (a subset of the MAML options)."""

    outer_trainable: Literal["all", "head_and_batchnorm", "head"]
    outer_lr_multipliers: list[LrMultiplier]
    body_warmup_iterations: int


def parameter_section(
    name: str, batchnorm_names: Collection[str], own_sections: Collection[str] = ()
) -> str:
    """The section of meta-parameter ``name`` (see the module docstring)."""
    if name.split(".", 1)[0] in own_sections:
        return name.split(".", 1)[0]
    if name.startswith("inner_lr."):
        return "inner_lr"
    if name.startswith("head."):
        return "head"
    if name.removesuffix(".step_offsets") in batchnorm_names:
        return "body_batchnorm"
    return "body"


def is_outer_trainable(
    section: str,
    outer_trainable: Literal["all", "head_and_batchnorm", "head"],
    own_sections: Collection[str] = (),
) -> bool:
    """Whether the outer optimizer updates ``section`` under ``outer_trainable``."""
    if outer_trainable == "all" or section in ALWAYS_TRAINED_SECTIONS or section in own_sections:
        return True
    return outer_trainable == "head_and_batchnorm" and section == "body_batchnorm"


def lr_multiplier(name: str, multipliers: Sequence[LrMultiplier]) -> float:
    """Outer lr multiplier of meta-parameter ``name``: the first matching pattern's, else 1."""
    for entry in multipliers:
        if re.search(entry.pattern, name):
            return entry.multiplier
    return 1.0


def parameter_groups(
    named_parameters: Sequence[tuple[str, nn.Parameter]],
    options: OuterGroupOptions,
    batchnorm_names: Collection[str],
    own_sections: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer groups of the outer-trainable meta-parameters with a nonzero multiplier.

    One group per (section, multiplier, warmup), in order of first appearance in
    ``named_parameters``; each carries ``name`` (e.g. ``"body x0.005 warmup 500"``),
    ``params``, ``parameter_names``, ``lr_multiplier`` and ``warmup_iterations`` (the
    body's, BatchNorm included, is ``body_warmup_iterations``). Frozen parameters (not
    outer-trainable, or multiplier 0) are in no group.
    """
    groups: dict[tuple[str, float, int], dict[str, Any]] = {}
    for name, parameter in named_parameters:
        section = parameter_section(name, batchnorm_names, own_sections)
        multiplier = lr_multiplier(name, options.outer_lr_multipliers)
        trainable = is_outer_trainable(section, options.outer_trainable, own_sections)
        if not trainable or multiplier == 0.0:
            continue
        warmup = options.body_warmup_iterations if section.startswith("body") else 0
        group = groups.setdefault(
            (section, multiplier, warmup),
            {
                "name": f"{section} x{multiplier:g}" + (f" warmup {warmup}" if warmup else ""),
                "params": [],
                "parameter_names": [],
                "lr_multiplier": multiplier,
                "warmup_iterations": warmup,
            },
        )
        group["params"].append(parameter)
        group["parameter_names"].append(name)
    return list(groups.values())


def trained_parameters(groups: Sequence[dict[str, Any]], iteration: int) -> list[nn.Parameter]:
    """The parameters of ``groups`` with a nonzero lr at ``iteration`` (past their warmup)."""
    return [
        p for group in groups if iteration >= group["warmup_iterations"] for p in group["params"]
    ]
