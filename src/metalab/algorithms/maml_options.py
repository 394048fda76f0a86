"""``experiments.<name>.options`` of algorithm ``maml`` (`metalab.algorithms.maml`): what
selects MAML, FOMAML, Meta-SGD, MAML++, ANIL, the zeroing trick and the two kinds of
dropout (the seed's task dropout and Lee et al.'s learned noise) on the one core."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from metalab.algorithms import learned_noise
from metalab.algorithms.outer_groups import LrMultiplier


class Options(learned_noise.LearnedNoiseOptions):
    """``experiments.<name>.options`` of algorithm ``maml`` (the ``learned_noise*`` ones:
    `metalab.algorithms.learned_noise.LearnedNoiseOptions`)."""

    model_config = ConfigDict(extra="forbid")

    inner_lr: float = Field(0.4, gt=0, le=10, description="inner-loop step size (initial value)")
    inner_steps: int = Field(1, ge=1, le=50, description="inner gradient steps in training")
    test_inner_steps: int = Field(
        3, ge=0, le=200, description="adaptation steps at test time (adapt)"
    )
    first_order: bool = Field(False, description="first-order MAML: drop second derivatives")
    adapt_parameters: Literal["all", "head"] = Field(
        "all", description="what the inner loop adapts: everything (MAML) or head.* (ANIL)"
    )
    inner_lr_mode: Literal["fixed", "per_parameter", "per_layer_per_step"] = Field(
        "fixed",
        description=(
            "fixed lr; Meta-SGD learned lr tensors; MAML++ learned lr per tensor and step "
            "(test-time steps beyond inner_steps reuse the last step's)"
        ),
    )
    multi_step_loss: bool = Field(False, description="MAML++: query loss after every step")
    multi_step_loss_iterations: int = Field(
        1000, ge=1, description="MAML++: iterations over which step weights anneal to last step"
    )
    per_step_batchnorm: bool = Field(
        False,
        description=(
            "MAML++: separate BatchNorm weight/bias per inner step (not adapted; extra "
            "test-time steps reuse the last set)"
        ),
    )
    first_order_until_iteration: int = Field(
        0, ge=0, description="MAML++ derivative-order annealing: first-order before this"
    )
    outer_trainable: Literal["all", "head_and_batchnorm", "head"] = Field(
        "all", description="meta-parameters the outer optimizer updates"
    )
    outer_lr_multipliers: list[LrMultiplier] = Field(
        default_factory=list,
        description="per-parameter outer lr multipliers, first matching pattern wins",
    )
    body_warmup_iterations: int = Field(
        0, ge=0, description="body (incl. BatchNorm) outer lr is 0 before this iteration"
    )
    head_init: Literal["default", "zeros"] = Field(
        "default", description="head initialisation: PyTorch's Linear default or zeros"
    )
    zero_head: bool = Field(
        False,
        description=(
            "zeroing trick (Kao et al. 2022): head weight and bias are zero at the start of "
            "every task's inner loop, in training and at test; the head is not meta-learned"
        ),
    )
    task_dropout_rates: list[float] | None = Field(
        None,
        description=(
            "task dropout (the seed project's 'Meta Dropout'; Conv4): one Bernoulli rate per "
            "block, one mask per task on support and query"
        ),
    )
    vectorise_tasks: bool = Field(
        True, description="run a chunk of tasks in one pass (same result as a per-task loop)"
    )
    task_chunk_size: int = Field(
        2, ge=1, le=1024, description="tasks per vectorised pass (small = cache-friendly)"
    )
    channels_last: bool = Field(
        True, description="channels_last memory format for convolution inputs"
    )
    task_parallel: bool = Field(
        True,
        description=(
            "vectorised path on the CPU with several torch threads: each thread runs whole "
            "task chunks single-threaded instead of all threads splitting every kernel"
        ),
    )

    @field_validator("task_dropout_rates")
    @classmethod
    def _rates_in_range(cls, rates: list[float] | None) -> list[float] | None:
        if rates is not None and any(not 0.0 <= rate < 1.0 for rate in rates):
            raise ValueError("task dropout rates must be in [0, 1)")
        return rates

    @model_validator(mode="after")
    def _zero_head_leaves_something_to_train(self) -> Options:
        if self.zero_head and self.outer_trainable == "head":
            raise ValueError(
                "zero_head resets the head for every task, so outer_trainable 'head' would "
                "train nothing: use 'all' or 'head_and_batchnorm'"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Options:
        if self.per_step_batchnorm and self.adapt_parameters == "head":
            raise ValueError(
                "per_step_batchnorm needs adapt_parameters 'all': ANIL runs the body once"
            )
        return self
