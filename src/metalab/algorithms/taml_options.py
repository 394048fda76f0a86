"""``experiments.<name>.options`` of algorithm ``taml`` (the registry reads it as
``metalab.algorithms.taml.Options``): every ``maml`` option plus the variant and its keys.

The seed project's "TAML" (a task encoder on ANIL), once ``variant: encoder``, is algorithm
``anil_task_encoder`` (`metalab.algorithms.anil_task_encoder`, its own options); params
naming the old variant are refused with the new name (`metalab.algorithms.registry`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from metalab.algorithms import maml

# The options that only one variant reads; setting one for another variant is an error.
VARIANT_OPTIONS: dict[str, tuple[str, ...]] = {
    "entropy": ("entropy_weight", "adapted_entropy_weight"),
    "inequality": (
        "inequality",
        "inequality_weight",
        "generalized_entropy_alpha",
        "inequality_losses",
    ),
}


class Options(maml.Options):
    """``experiments.<name>.options`` of algorithm ``taml``: every ``maml`` option plus
    the variant and its keys (a key of another variant is an error)."""

    variant: Literal["entropy", "inequality"] = Field(
        "entropy", description="entropy maximisation or inequality minimisation (Jamal & Qi)"
    )
    entropy_weight: float = Field(
        0.1, ge=0, le=100, description="entropy: lambda of minus the initial model's entropy"
    )
    adapted_entropy_weight: float = Field(
        0.0, ge=0, le=100, description="entropy: weight of the adapted model's entropy (paper)"
    )
    inequality: Literal["theil", "generalized_entropy", "gini"] = Field(
        "theil", description="inequality: measure over the meta-batch's task losses"
    )
    # Untuned default. The gradient of lambda x Theil pushes a task's loss *up* when it is
    # well below the meta-batch mean, by about lambda ln(l / mu) / mu per task against the
    # mean loss's 1 per task; lambda ~ 1 would already raise easy tasks' losses.
    inequality_weight: float = Field(
        0.1, ge=0, le=100, description="inequality: lambda of the inequality measure"
    )
    generalized_entropy_alpha: float = Field(
        2.0, ge=0, le=10, description="generalized_entropy: alpha (0: mean log deviation)"
    )
    inequality_losses: Literal["initial_support", "initial_query", "adapted_query"] = Field(
        "initial_support",
        description=(
            "inequality: the per-task losses it measures: the initial (un-adapted) model's "
            "on the support set (the paper, Algorithm 2), on the query set, or the adapted "
            "model's on the query set (not the paper; the behaviour before 2026-12-03)"
        ),
    )

    @field_validator(*(key for keys in VARIANT_OPTIONS.values() for key in keys))
    @classmethod
    def _belongs_to_the_variant(cls, value: Any, info: ValidationInfo) -> Any:
        """A variant's key may keep its default under another variant (so dumped options
        load again), but setting it there is a mistake worth reporting."""
        variant = info.data.get("variant")
        owner = next(name for name, keys in VARIANT_OPTIONS.items() if info.field_name in keys)
        if value == cls.model_fields[info.field_name].default:
            return value
        if variant is not None and variant != owner:
            raise ValueError(f"applies only to variant {owner!r}, not {variant!r}; remove it")
        inequality = info.data.get("inequality")
        if info.field_name == "generalized_entropy_alpha" and inequality != "generalized_entropy":
            raise ValueError(
                f"applies only to inequality 'generalized_entropy', not {inequality!r}"
            )
        return value

    @model_validator(mode="after")
    def _zero_head_leaves_the_variant_a_term(self) -> Options:
        """The zeroing trick makes every initial prediction uniform (loss ln N, entropy
        ln N on every task): a term on the initial model would be a constant."""
        if not self.zero_head:
            return self
        if self.variant == "entropy" and self.entropy_weight > 0:
            raise ValueError(
                "zero_head makes the initial entropy ln N on every task: set entropy_weight 0"
            )
        if self.variant == "inequality" and self.inequality_losses != "adapted_query":
            raise ValueError(
                "zero_head makes every initial loss ln N, so their inequality is 0: "
                "inequality_losses must be adapted_query"
            )
        return self
