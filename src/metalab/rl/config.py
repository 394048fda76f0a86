"""Configuration of one meta-RL experiment.

Where the defaults come from, for 2D navigation: the MAML paper (Finn et al. 2017, sec.
5.3) gives one vanilla policy-gradient inner step of size 0.1 on 20 trajectories per task
and evaluates with the step halved after the first (`eval_step_schedule`), 40
trajectories per step; its code (cbfinn/maml_rl, on rllab) fits the linear feature
baseline. The rest is pytorch-maml-rl's `configs/maml/2d-navigation.yaml`, not the
paper: meta-batch 20 tasks, gamma 0.99, GAE lambda 1.0, a 2 x 64 tanh policy (the paper
describes 2 x 100 ReLU), and its Gaussian policy's std floor of 1e-6 (`min_std`). Unlike
both, the meta-step is plain Adam instead of TRPO, and the iteration count trains in a
few minutes on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from metalab.schema import (
    ExperimentName,
    Sections,
    TrackingConfig,
    load_sections,
    named_entry,
)


class RLExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["maml_rl", "anil_rl", "reptile_rl", "joint_pg"] = Field(
        "maml_rl",
        description="Meta-learner; joint_pg is the MAML paper's 'pretrained' reference: "
        "plain policy gradient on the mixture of training tasks, no adaptation in training.",
    )
    env: Literal["navigation_2d", "bernoulli_bandit"] = Field(
        "navigation_2d", description="Task family."
    )
    iterations: int = Field(300, ge=1, le=1_000_000, description="Meta-iterations.")
    meta_batch_size: int = Field(20, ge=1, le=10_000, description="Tasks per meta-iteration.")
    trajectories_per_task: int = Field(
        20, ge=2, le=10_000, description="Trajectories sampled per task and adaptation stage."
    )
    horizon: int = Field(100, ge=1, le=10_000, description="Maximum steps per trajectory.")
    num_arms: int = Field(5, ge=2, le=1_000, description="Arms of the bandit family.")
    hidden_size: int = Field(64, ge=1, le=4096, description="Width of the policy's hidden layers.")
    hidden_layers: int = Field(2, ge=1, le=8, description="Hidden tanh layers of the policy.")
    init_std: float = Field(
        1.0, gt=0.0, le=10.0, description="Initial standard deviation of the Gaussian policy."
    )
    min_std: float = Field(
        1e-6,
        gt=0.0,
        le=10.0,
        description="Floor of the Gaussian policy's standard deviation (pytorch-maml-rl: "
        "1e-6); at most init_std.",
    )
    inner_lr: float = Field(0.1, gt=0.0, le=100.0, description="Inner policy-gradient step size.")
    inner_steps: int = Field(
        1, ge=1, le=50, description="Inner steps of MAML-RL / ANIL-RL during meta-training."
    )
    first_order: bool = Field(
        False, description="MAML-RL / ANIL-RL: hold inner gradients constant (no second order)."
    )
    inner_estimator: Literal["reinforce", "lvc", "dice"] = Field(
        "reinforce",
        description="MAML-RL / ANIL-RL meta-gradient: reinforce (MAML paper; misses how the "
        "pre-adaptation sampling depends on theta), lvc (ProMP low-variance curvature) or "
        "dice (unbiased DiCE objective with a leave-one-task-out baseline).",
    )
    outer_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="Optimizer of the MAML-RL / ANIL-RL meta-step."
    )
    outer_lr: float = Field(
        3e-3, gt=0.0, le=10.0, description="Meta learning rate (MAML-RL / ANIL-RL)."
    )
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="Discount factor.")
    gae_lambda: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda.")
    baseline: Literal["linear", "mlp"] = Field(
        "linear",
        description="Value baseline: per-task linear feature fit, or an MLP critic fitted per "
        "task from a meta-learned start (with gae_lambda < 1 the inner step is actor-critic).",
    )
    linear_baseline_regularization: float = Field(
        1e-5, gt=0.0, le=1e3, description="Ridge coefficient of the linear baseline."
    )
    critic_hidden_size: int = Field(64, ge=1, le=4096, description="Width of the MLP critic.")
    critic_fit_steps: int = Field(
        20, ge=1, le=1000, description="Per-task Adam steps fitting the MLP critic."
    )
    critic_fit_lr: float = Field(
        0.01, gt=0.0, le=10.0, description="Step size of the per-task critic fit."
    )
    critic_meta_lr: float = Field(
        1e-3, gt=0.0, le=10.0, description="Adam rate of the critic's meta-learned start."
    )
    reptile_epsilon: float = Field(
        0.5, gt=0.0, le=1.0, description="Reptile outer interpolation factor at the start."
    )
    reptile_epsilon_final: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Reptile's factor at the end of training, reached linearly (as "
        "openai/supervised-reptile anneals its outer step, to 0 in its published runs); "
        "equal to reptile_epsilon for a constant factor.",
    )
    reptile_inner_steps: int = Field(
        3, ge=1, le=50, description="Inner policy-gradient steps of Reptile-RL."
    )
    num_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads while training/evaluating (ops are small; more "
        "threads mostly add contention).",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="Training seed: weights, training tasks and sampling. The pipeline sets "
        "it per stage from dvc.yaml's seed matrix (leave it unset there).",
    )
    eval_seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="Seed of the held-out tasks and of the evaluation's sampling, the same "
        "for every training seed (so seeds differ by training only).",
    )
    eval_tasks: int = Field(40, ge=2, le=100_000, description="Held-out evaluation tasks.")
    eval_trajectories_per_task: int = Field(
        40,
        ge=2,
        le=10_000,
        description="Trajectories per held-out task and adaptation step (MAML paper: 40).",
    )
    eval_step_schedule: Literal["halve_after_first", "constant"] = Field(
        "halve_after_first",
        description="Held-out adaptation step sizes: inner_lr for the first step, then "
        "inner_lr / 2 (the MAML paper's evaluation), or inner_lr for every step.",
    )
    eval_adaptation_steps: list[int] = Field(
        default_factory=lambda: [1, 2, 3],
        description="Adaptation steps at which held-out return is reported (0 always is).",
    )

    @model_validator(mode="after")
    def _estimator_needs_meta_gradient(self) -> RLExperimentConfig:
        if self.algorithm not in ("maml_rl", "anil_rl") and self.inner_estimator != "reinforce":
            raise ValueError(f"inner_estimator applies to maml_rl / anil_rl, not {self.algorithm}")
        if self.min_std > self.init_std:
            raise ValueError(f"min_std {self.min_std} is above init_std {self.init_std}")
        return self

    @field_validator("eval_adaptation_steps")
    @classmethod
    def _positive_increasing(cls, steps: list[int]) -> list[int]:
        if not steps or any(step < 1 for step in steps) or steps != sorted(set(steps)):
            raise ValueError("eval_adaptation_steps must be non-empty, positive and increasing")
        return steps


def run_name(experiment: str, seed: int | None) -> str:
    """What one training seed's files and stages are called: ``<experiment>-s<seed>``
    (dvc.yaml's ``train_rl@<experiment>-<seed>``); the bare experiment without a seed."""
    return experiment if seed is None else f"{experiment}-s{seed}"


def dvc_stage_key(experiment: str, seed: int | None) -> str:
    """The key of the seed's stages, ``train_rl@<key>`` / ``evaluate_rl@<key>``: DVC's
    matrix joins the values with '-' (``maml_rl-0``)."""
    return experiment if seed is None else f"{experiment}-{seed}"


def with_seed(config: RLExperimentConfig, experiment: str, seed: int | None) -> RLExperimentConfig:
    """``config`` trained with ``seed`` (None: as configured). A seed given both ways is
    refused, so a params.yaml seed never goes silently unused."""
    if seed is None:
        return config
    if "seed" in config.model_fields_set:
        raise ValueError(
            f"rl_experiments.{experiment}.seed = {config.seed}: the pipeline trains the seeds "
            "of dvc.yaml's seed matrix; remove the key"
        )
    return RLExperimentConfig.model_validate({**config.model_dump(), "seed": seed})


class RLParams(Sections):
    """The sections the RL stages read: ``rl_experiments`` and ``tracking``."""

    rl_experiments: dict[ExperimentName, RLExperimentConfig] = Field(default_factory=dict)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def rl_experiment(self, name: str) -> RLExperimentConfig:
        return named_entry(self.rl_experiments, name, "RL experiment")


def load_rl_params(path: str | Path = "params.yaml") -> RLParams:
    """Read and validate params.yaml's RL sections; `ParamsError` with a one-line message."""
    return load_sections(path, RLParams)
