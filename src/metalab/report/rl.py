"""The meta-RL part of the report: a table of held-out returns before and after
adaptation, and a plot of return vs adaptation steps per learner (one panel per env,
since returns are not comparable across environments).

The step counts (columns of the table, points of the plot) are whatever the evaluations
measured (`RLEvaluationMetrics.returns`), any number of them. A learner's returns after
more steps than it took per task in meta-training are marked (`beyond_training`; `*` in
the table, hollow markers in the plot). Reference policies evaluated on the same tasks
(random initialisation, oracle; `RLEvaluationMetrics.references`) are rows of their own
(`policy` column; dashed grey in the plot); an oracle repeated by several experiments
with identical returns appears once.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from metalab.records import META_LEARNED, RLEvaluationMetrics, RLTrainSummary, metrics_files
from metalab.report.collect import read_record
from metalab.report.plots import _empty, _save, experiment_colors, plt
from metalab.report.tables import durations, markdown_table, number

RESULT_COLUMNS = [
    "experiment",
    "policy",
    "algorithm",
    "env",
    "steps",
    "mean_return",
    "ci95",
    "trained_steps",
    "beyond_training",
    "training_seconds",
    "tasks_per_s",
    "peak_memory_mb",
]


def rl_results(metrics_dir: str | Path, notes: list[str] | None = None) -> pd.DataFrame:
    """One row per (experiment, adaptation steps) from metrics/{eval_rl,train_rl}/*.json.

    Columns `RESULT_COLUMNS`: experiment, algorithm, env, steps, mean_return, ci95,
    training_seconds, tasks_per_s, peak_memory_mb (training figures repeat on each row of
    an experiment; None without a training summary).

    A file that is not a valid RL evaluation or training summary raises
    `MetricsFileError`; given `notes`, it is left out instead and the note says why.
    """
    metrics_dir = Path(metrics_dir)
    rows = []
    seen_oracles: set[tuple] = set()
    for path in metrics_files(metrics_dir / "eval_rl"):
        evaluation = read_record(RLEvaluationMetrics, path, notes)
        if evaluation is None:
            continue
        training = read_record(RLTrainSummary, metrics_dir / "train_rl" / path.name, notes)
        cost = {
            "training_seconds": training.training_seconds if training is not None else None,
            "tasks_per_s": training.tasks_per_s if training is not None else None,
            "peak_memory_mb": training.peak_memory_mb if training is not None else None,
        }
        no_cost = dict.fromkeys(cost)
        policies = {META_LEARNED: evaluation.returns, **evaluation.references}
        for policy, returns in policies.items():
            if policy == "oracle":
                signature = (evaluation.env, tuple(r.mean_return for r in returns.values()))
                if signature in seen_oracles:
                    continue
                seen_oracles.add(signature)
            learner = policy == META_LEARNED
            trained = evaluation.trained_steps
            for steps, result in returns.items():
                rows.append(
                    {
                        "experiment": evaluation.experiment,
                        "policy": policy,
                        "algorithm": evaluation.algorithm,
                        "env": evaluation.env,
                        "steps": steps,
                        "mean_return": result.mean_return,
                        "ci95": result.ci95,
                        "trained_steps": trained,
                        "beyond_training": learner and trained is not None and steps > trained,
                        **(cost if learner else no_cost),
                    }
                )
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    frame["reference"] = frame["policy"] != META_LEARNED
    frame = frame.sort_values(["env", "reference", "experiment", "policy", "steps"])
    return frame.drop(columns="reference")


def row_label(experiment: str, policy: str) -> str:
    """A learner's row is its experiment; a reference's names the reference."""
    if policy == META_LEARNED:
        return experiment
    if policy == "oracle":
        return "reference: oracle"
    return f"reference: {policy.replace('_', ' ')} ({experiment})"


def _steps_label(steps: int) -> str:
    return f"{steps} step{'s' if steps > 1 else ''}"


def rl_markdown(results: pd.DataFrame) -> str:
    """The RL table: one row per experiment, return ± 95% CI per evaluated step count, the
    gain of the fewest adaptation steps over none, and the training cost."""
    if results.empty:
        return "## Meta-RL\n\nNo RL evaluations found (metrics/eval_rl/).\n"
    steps = sorted(results["steps"].unique())
    first_step = next((s for s in steps if s > 0), None)  # the gain column's step count
    header = ["experiment", "env"]
    header += ["before" if s == 0 else f"after {_steps_label(s)}" for s in steps]
    if first_step is not None:
        header.append(f"gain ({_steps_label(first_step)})")
    header += ["training", "tasks/s", "peak MB"]
    rows = []
    groups = list(results.groupby(["experiment", "policy", "env"], sort=False))
    training_times = durations(group.iloc[0]["training_seconds"] for _, group in groups)
    for ((experiment, policy, env), group), training_time in zip(
        groups, training_times, strict=True
    ):
        by_step = group.set_index("steps")
        cells = [row_label(experiment, policy), env]
        cells += [
            f"{by_step.loc[s, 'mean_return']:.2f} ± {by_step.loc[s, 'ci95']:.2f}"
            + ("*" if bool(by_step.loc[s, "beyond_training"]) else "")
            if s in by_step.index
            else "-"
            for s in steps
        ]
        if first_step is not None:
            if 0 in by_step.index and first_step in by_step.index:
                gain = by_step.loc[first_step, "mean_return"] - by_step.loc[0, "mean_return"]
                cells.append(f"{gain:+.2f}")
            else:
                cells.append("-")
        first = group.iloc[0]
        cells += [
            training_time,
            number(first["tasks_per_s"], 1),
            number(first["peak_memory_mb"]),
        ]
        rows.append(cells)
    return (
        "## Meta-RL: return on held-out tasks (mean ± 95% CI over tasks)\n\n"
        + markdown_table(header, rows, "ll" + "r" * (len(header) - 2))
        + "\n"
        + (
            "* more adaptation steps than the learner took per task in meta-training.\n"
            if results["beyond_training"].astype(bool).any()
            else ""
        )
    )


def plot_rl_adaptation(results: pd.DataFrame, path: str | Path) -> Path:
    """Return vs adaptation steps with 95% CI error bars, one line per learner."""
    path = Path(path)
    if results.empty:
        return _empty(path, "Meta-RL adaptation", "no RL evaluations yet")
    envs = list(dict.fromkeys(results["env"]))
    learners = results[results["policy"] == META_LEARNED]
    colors = experiment_colors(list(dict.fromkeys(learners["experiment"])))
    figure, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    for axis, env in zip(axes[0], envs, strict=True):
        in_env = results[results["env"] == env]
        for (experiment, policy), group in in_env.groupby(["experiment", "policy"], sort=False):
            reference = policy != META_LEARNED
            axis.errorbar(
                group["steps"],
                group["mean_return"],
                yerr=group["ci95"],
                marker="s" if reference else "o",
                capsize=4,
                label=row_label(experiment, policy),
                color="grey" if reference else colors[experiment],
                linestyle="--" if reference else "-",
                alpha=0.7 if reference else 1.0,
            )
            beyond = group[group["beyond_training"].astype(bool)]
            if not reference and not beyond.empty:
                axis.plot(
                    beyond["steps"],
                    beyond["mean_return"],
                    "o",
                    markerfacecolor="white",
                    color=colors[experiment],
                )
        axis.set_title(f"{env}: return after adaptation")
        axis.set_xlabel("policy-gradient adaptation steps")
        axis.set_ylabel("mean return on held-out tasks")
        axis.set_xticks(sorted(results["steps"].unique()))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)
