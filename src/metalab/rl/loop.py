"""Meta-RL training and held-out evaluation.

:class:`RLTrainer` holds the whole training state (policy, outer optimizer, baseline,
task/sampling generator, iteration, history) behind ``state_dict`` /
``load_state_dict``, so a run resumed from a saved state ends with the same weights as
an uninterrupted one. :func:`train_rl` drives it with a tqdm bar; :func:`evaluate_rl`
measures held-out return before and after adaptation.

Both compute on a chosen ``device`` (default the CPU): policy, critic and environment
live there, while the task/sampling generator stays on the CPU, so a run draws the same
random numbers on every device. Saved states (agent, checkpoints) hold CPU tensors, so
files move between machines; loading copies them to the run's device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metalab.errors import MetalabError
from metalab.io import on_cpu, save_torch
from metalab.rl.adaptation import sample_adaptation
from metalab.rl.baselines import Baseline, build_baseline
from metalab.rl.config import RLExperimentConfig
from metalab.rl.envs import MetaRLEnvironment, build_environment, evaluation_tasks
from metalab.rl.learners import ANILRL, MAMLRL, JointPolicyGradient, ReptileRL, RLMetaLearner
from metalab.rl.policies import Policy, build_policy

# Seeds derived from ``config.seed`` (critic) and ``config.eval_seed`` (evaluation
# sampling) for the separate random streams.
CRITIC_SEED_OFFSET = 1
EVALUATION_SAMPLING_SEED_OFFSET = 2

# Fields that must agree between a saved state and the config resuming it.
_RESUME_INVARIANT_FIELDS = ("algorithm", "env", "seed", "meta_batch_size", "horizon")


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Use ``num_threads`` intra-op threads inside the block, restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_snapshot(tree: Any) -> Any:
    """A deep copy of ``tree`` with every tensor on the CPU (what files hold)."""
    return copy.deepcopy(on_cpu(tree))


def build_components(
    config: RLExperimentConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[MetaRLEnvironment, Policy, Baseline]:
    """Environment, freshly initialised policy and baseline for ``config``, on ``device``
    (weights initialised on the CPU and moved: the same start on every device)."""
    env = build_environment(config.env, config.horizon, config.num_arms, dtype, device)
    policy = build_policy(
        env,
        config.hidden_size,
        config.hidden_layers,
        config.init_std,
        config.seed,
        dtype,
        device,
        min_std=config.min_std,
    )
    baseline = build_baseline(
        config.baseline,
        env.observation_dim,
        regularization=config.linear_baseline_regularization,
        hidden_size=config.critic_hidden_size,
        fit_steps=config.critic_fit_steps,
        fit_lr=config.critic_fit_lr,
        meta_lr=config.critic_meta_lr,
        seed=config.seed + CRITIC_SEED_OFFSET,
        dtype=dtype,
        device=device,
    )
    return env, policy, baseline


def build_learner(
    config: RLExperimentConfig, env: MetaRLEnvironment, policy: Policy, baseline: Baseline
) -> RLMetaLearner:
    """The learner named by ``config.algorithm``."""
    common = dict(
        env=env,
        policy=policy,
        baseline=baseline,
        trajectories_per_task=config.trajectories_per_task,
        inner_lr=config.inner_lr,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
    )
    if config.algorithm == "reptile_rl":
        return ReptileRL(
            **common,
            inner_steps=config.reptile_inner_steps,
            epsilon=config.reptile_epsilon,
            epsilon_final=config.reptile_epsilon_final,
            iterations=config.iterations,
        )
    if config.algorithm == "joint_pg":
        return JointPolicyGradient(
            **common, outer_lr=config.outer_lr, outer_optimizer=config.outer_optimizer
        )
    learner_class = MAMLRL if config.algorithm == "maml_rl" else ANILRL
    return learner_class(
        **common,
        inner_steps=config.inner_steps,
        first_order=config.first_order,
        outer_lr=config.outer_lr,
        outer_optimizer=config.outer_optimizer,
        inner_estimator=config.inner_estimator,
    )


class RLTrainer:
    """Everything a meta-RL run needs to continue exactly where it stopped.

    Computes on ``device``; the task/sampling generator is a CPU generator on every device
    (its draws are moved), and the states it hands out hold CPU tensors.
    """

    def __init__(
        self,
        config: RLExperimentConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.env, self.policy, self.baseline = build_components(config, dtype, self.device)
        self.learner = build_learner(config, self.env, self.policy, self.baseline)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.history: list[dict[str, float]] = []

    def run_iteration(self) -> dict[str, float]:
        """One meta-iteration; raises ``NonFiniteLossError`` before touching the weights."""
        tasks = self.env.sample_tasks(self.config.meta_batch_size, self.generator)
        metrics = self.learner.meta_step(tasks, self.generator, self.iteration)
        self.iteration += 1
        self.history.append(metrics)
        return metrics

    def agent_state(self) -> dict:
        """What evaluation needs: policy weights and baseline state (CPU copies)."""
        return cpu_snapshot(
            {"policy": self.policy.state_dict(), "baseline": self.baseline.state_dict()}
        )

    def state_dict(self) -> dict:
        """A snapshot (deep copy, CPU tensors) of the full training state."""
        return cpu_snapshot(
            {
                "config": self.config.model_dump(),
                "iteration": self.iteration,
                "policy": self.policy.state_dict(),
                "optimizer": self.learner.optimizer_state(),
                "baseline": self.baseline.state_dict(),
                "generator": self.generator.get_state(),
                "history": self.history,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (tensors on any device; copied to this trainer's)."""
        saved = state["config"]
        for name in _RESUME_INVARIANT_FIELDS:
            if saved[name] != getattr(self.config, name):
                raise ValueError(
                    f"cannot resume: saved {name}={saved[name]!r}, "
                    f"config has {getattr(self.config, name)!r}"
                )
        self.policy.load_state_dict(state["policy"])
        self.learner.load_optimizer_state(copy.deepcopy(state["optimizer"]))
        self.baseline.load_state_dict(copy.deepcopy(state["baseline"]))
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.history = copy.deepcopy(list(state["history"]))


def train_rl(
    config: RLExperimentConfig,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    state: dict | None = None,
    *,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> tuple[dict, list[dict[str, float]]]:
    """Meta-train until ``config.iterations`` on ``device``; resume from ``state`` when given.

    ``on_iteration(iteration, metrics)`` runs after every meta-iteration (0-based index).
    ``on_checkpoint(iterations_done, trainer_state)`` runs every ``checkpoint_every``
    iterations with a full, deep-copied training state for :class:`RLTrainer` /
    ``train_rl(state=...)``. Returns the agent state (``{"policy", "baseline"}``) and the
    per-iteration metrics history; states hold CPU tensors. ``threads`` torch threads
    while training (default ``config.num_threads``). Raises
    ``NonFiniteLossError`` naming the iteration.
    """
    with torch_threads(config.num_threads if threads is None else threads):
        return _train(
            config, on_iteration, state, on_checkpoint, checkpoint_every, progress, device
        )


def _train(
    config: RLExperimentConfig,
    on_iteration: Callable[[int, dict[str, float]], None] | None,
    state: dict | None,
    on_checkpoint: Callable[[int, dict], None] | None,
    checkpoint_every: int,
    progress: bool,
    device: torch.device | str,
) -> tuple[dict, list[dict[str, float]]]:
    trainer = RLTrainer(config, device=device)
    if state is not None:
        trainer.load_state_dict(state)
    with tqdm(
        total=config.iterations,
        initial=trainer.iteration,
        desc=config.algorithm,
        disable=not progress,
    ) as bar:
        while trainer.iteration < config.iterations:
            metrics = trainer.run_iteration()
            if on_iteration is not None:
                on_iteration(trainer.iteration - 1, metrics)
            if on_checkpoint is not None and checkpoint_every > 0:
                if trainer.iteration % checkpoint_every == 0:
                    on_checkpoint(trainer.iteration, trainer.state_dict())
            bar.update(1)
            bar.set_postfix(
                pre=f"{metrics['pre_adaptation_return']:.2f}",
                post=f"{metrics['post_adaptation_return']:.2f}",
                tasks_per_s=f"{metrics['tasks_per_second']:.1f}",
            )
    return trainer.agent_state(), trainer.history


def _summarise(returns: torch.Tensor) -> dict:
    """Mean, std and 95% CI (1.96 * std / sqrt(n)) of per-task returns [n]."""
    count = returns.numel()
    std = float(returns.std(unbiased=True)) if count > 1 else 0.0
    return {
        "mean_return": float(returns.mean()),
        "std": std,
        "ci95": 1.96 * std / math.sqrt(count),
        "per_task_returns": returns.tolist(),
    }


def save_agent(path: str | Path, config: RLExperimentConfig, agent_state: dict) -> None:
    """Write a trained agent (``{"policy", "baseline"}`` state) and its config, atomically;
    the file holds CPU tensors whatever device the state is on."""
    save_torch(path, {"config": config.model_dump(), "agent": agent_state})


def load_agent(path: str | Path) -> dict:
    """The agent state saved by `save_agent`, CPU tensors (`evaluate_rl` moves them to its
    device); read with ``weights_only=True`` (no code in the file runs), `MetalabError` in
    one line for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise MetalabError(
            f"{path}: no such RL model (train it with `dvc repro train_rl@<name>-<seed>`)"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # foreign, truncated or crafted bytes: all the same here
        raise MetalabError(
            f"{path}: not a metalab RL model ({type(error).__name__}); retrain it"
        ) from error
    if not isinstance(saved, dict) or not isinstance(saved.get("agent"), dict):
        raise MetalabError(f"{path}: not a metalab RL model (no 'agent' entry); retrain it")
    return saved["agent"]


def evaluation_step_sizes(config: RLExperimentConfig, steps: int) -> list[float]:
    """Step size of each of ``steps`` held-out adaptation steps: ``inner_lr`` for the first;
    ``halve_after_first`` halves it for the later ones (the MAML paper's evaluation)."""
    later = config.inner_lr / 2 if config.eval_step_schedule == "halve_after_first" else None
    return [config.inner_lr if step == 0 or later is None else later for step in range(steps)]


def trained_adaptation_steps(config: RLExperimentConfig) -> int:
    """Inner steps the learner took per task while meta-training (0 for ``joint_pg``)."""
    if config.algorithm == "reptile_rl":
        return config.reptile_inner_steps
    if config.algorithm == "joint_pg":
        return 0
    return config.inner_steps


def evaluate_rl(
    config: RLExperimentConfig,
    agent_state: dict,
    tasks: torch.Tensor | None = None,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> dict:
    """Held-out return before adaptation and after each of ``config.eval_adaptation_steps``.

    agent_state: ``{"policy": state_dict, "baseline": state}`` as returned by
    :func:`train_rl`. tasks: [n, task_dim], by default the fixed held-out tasks of
    ``config.eval_seed`` (whatever the training seed). Each adaptation step samples
    ``eval_trajectories_per_task`` fresh trajectories with the current policy and takes one
    policy-gradient step (ANIL-RL adapts the head only) with the sizes of
    :func:`evaluation_step_sizes`. A task's return is the mean undiscounted return of its
    trajectories; statistics are over tasks. Returns
    ``{"num_tasks", "results": [...], "metrics": {flat floats}, "references": {name:
    {"results", "metrics"}}}`` with the reference policies on the same tasks:
    ``random_init`` (the untrained initialisation the run started from, adapted the same
    way) and ``oracle`` (the environment's task-aware policy, which does not adapt: the
    same return at every step count). Computes on ``device`` (agent tensors from any device
    are copied there) with ``threads`` torch threads (default ``config.num_threads``); the
    sampling generator is a CPU one seeded from ``config.eval_seed``, so every device and
    every training seed sees the same random numbers.
    """
    with torch_threads(config.num_threads if threads is None else threads):
        device = torch.device(device)
        env, policy, baseline = build_components(config, device=device)
        if tasks is None:
            tasks = evaluation_tasks(env, config.eval_tasks, config.eval_seed)
        tasks = tasks.to(device)
        untrained = {"policy": policy.state_dict(), "baseline": baseline.state_dict()}
        untrained = cpu_snapshot(untrained)
        learned = _adapted_returns(config, agent_state, tasks, device)
        references = {
            "random_init": _adapted_returns(config, untrained, tasks, device),
            "oracle": _oracle_returns(config, env, tasks),
        }
        return {"num_tasks": int(tasks.shape[0]), **learned, "references": references}


def evaluation_generator(config: RLExperimentConfig) -> torch.Generator:
    """The CPU generator of a held-out evaluation, from ``config.eval_seed``."""
    return torch.Generator().manual_seed(config.eval_seed + EVALUATION_SAMPLING_SEED_OFFSET)


def _adapted_returns(
    config: RLExperimentConfig, agent_state: dict, tasks: torch.Tensor, device: torch.device
) -> dict:
    env, policy, baseline = build_components(config, device=device)
    policy.load_state_dict(agent_state["policy"])
    baseline.load_state_dict(copy.deepcopy(agent_state["baseline"]))
    learner = build_learner(config, env, policy, baseline)
    generator = evaluation_generator(config)
    max_steps = max(config.eval_adaptation_steps)
    buffer, _, _ = sample_adaptation(
        env,
        policy,
        tasks,
        config.eval_trajectories_per_task,
        max_steps,
        evaluation_step_sizes(config, max_steps),
        learner.adapted_parameter_names(),
        baseline,
        config.gamma,
        config.gae_lambda,
        generator,
        track_meta_gradient=False,
    )
    batches = [*buffer.pre_adaptation, buffer.post_adaptation]
    return _step_summaries(
        {
            steps: batches[steps].trajectories.episode_returns().mean(dim=1)
            for steps in [0, *config.eval_adaptation_steps]
        }
    )


@torch.no_grad()
def _oracle_returns(
    config: RLExperimentConfig, env: MetaRLEnvironment, tasks: torch.Tensor
) -> dict:
    """The environment's task-aware policy on ``tasks``, reported at every step count."""
    generator = evaluation_generator(config)
    state = env.reset(tasks, config.eval_trajectories_per_task)
    total = torch.zeros(tasks.shape[0], config.eval_trajectories_per_task, device=tasks.device)
    for _ in range(env.horizon):
        result = env.step(state, env.oracle_actions(state), generator)
        total = total + result.rewards.to(total.dtype)
        state = result.state
        if env.is_finished(state):
            break
    task_returns = total.mean(dim=1)
    return _step_summaries({steps: task_returns for steps in [0, *config.eval_adaptation_steps]})


def _step_summaries(task_returns: dict[int, torch.Tensor]) -> dict:
    """``{"results", "metrics"}`` from per-task returns [n] at each step count."""
    results = []
    metrics: dict[str, float] = {}
    for steps, returns in task_returns.items():
        summary = {"adaptation_steps": steps, **_summarise(returns)}
        results.append(summary)
        key = "return_pre_adaptation" if steps == 0 else f"return_after_{steps}_steps"
        metrics[key] = summary["mean_return"]
        metrics[f"{key}_ci95"] = summary["ci95"]
        if steps > 0:
            metrics[f"adaptation_gain_{steps}_steps"] = (
                summary["mean_return"] - results[0]["mean_return"]
            )
    return {"results": results, "metrics": metrics}
