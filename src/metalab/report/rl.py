"""The meta-RL part of the report: a table of held-out returns before and after
adaptation, and a plot of return vs adaptation steps per learner (one panel per env,
since returns are not comparable across environments)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from metalab.report.plots import _empty, _save, experiment_colors, plt
from metalab.report.tables import durations, markdown_table, number

STEP_KEYS = {"before_adaptation": 0, "after_1_steps": 1, "after_2_steps": 2, "after_3_steps": 3}


def rl_results(metrics_dir: str | Path) -> pd.DataFrame:
    """One row per (experiment, adaptation steps) from metrics/{eval_rl,train_rl}/*.json.

    Columns: experiment, algorithm, env, steps, mean_return, ci95, training_seconds,
    tasks_per_s, peak_memory_mb (training figures repeat on each row of an experiment).
    """
    metrics_dir = Path(metrics_dir)
    rows = []
    for path in sorted((metrics_dir / "eval_rl").glob("*.json")):
        evaluation = json.loads(path.read_text())
        train_file = metrics_dir / "train_rl" / path.name
        training = json.loads(train_file.read_text()) if train_file.exists() else {}
        for key, value in evaluation.items():
            steps = STEP_KEYS.get(key)
            if steps is None and key.startswith("after_") and key.endswith("_steps"):
                steps = int(key.removeprefix("after_").removesuffix("_steps"))
            if steps is None or not isinstance(value, dict):
                continue
            rows.append(
                {
                    "experiment": evaluation["experiment"],
                    "algorithm": evaluation.get("algorithm"),
                    "env": evaluation.get("env"),
                    "steps": steps,
                    "mean_return": value["mean_return"],
                    "ci95": value["ci95"],
                    "training_seconds": training.get("training_seconds"),
                    "tasks_per_s": training.get("tasks_per_s"),
                    "peak_memory_mb": training.get("peak_memory_mb"),
                }
            )
    columns = [
        "experiment",
        "algorithm",
        "env",
        "steps",
        "mean_return",
        "ci95",
        "training_seconds",
        "tasks_per_s",
        "peak_memory_mb",
    ]
    return pd.DataFrame(rows, columns=columns).sort_values(["env", "experiment", "steps"])


def rl_markdown(results: pd.DataFrame) -> str:
    """The RL table: one row per experiment, return ± 95% CI per adaptation step, the gain
    of one step over none, and the training cost."""
    if results.empty:
        return "## Meta-RL\n\nNo RL evaluations found (metrics/eval_rl/).\n"
    steps = sorted(results["steps"].unique())
    header = ["experiment", "env"]
    header += ["before" if s == 0 else f"after {s} step{'s' if s > 1 else ''}" for s in steps]
    header += ["gain (1 step)", "training", "tasks/s", "peak MB"]
    rows = []
    groups = list(results.groupby(["experiment", "env"], sort=False))
    training_times = durations(group.iloc[0]["training_seconds"] for _, group in groups)
    for ((experiment, env), group), training_time in zip(groups, training_times, strict=True):
        by_step = group.set_index("steps")
        cells = [experiment, env]
        cells += [
            f"{by_step.loc[s, 'mean_return']:.2f} ± {by_step.loc[s, 'ci95']:.2f}"
            if s in by_step.index
            else "-"
            for s in steps
        ]
        if 0 in by_step.index and 1 in by_step.index:
            cells.append(f"{by_step.loc[1, 'mean_return'] - by_step.loc[0, 'mean_return']:+.2f}")
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
    )


def plot_rl_adaptation(results: pd.DataFrame, path: str | Path) -> Path:
    """Return vs adaptation steps with 95% CI error bars, one line per learner."""
    path = Path(path)
    if results.empty:
        return _empty(path, "Meta-RL adaptation", "no RL evaluations yet")
    envs = list(dict.fromkeys(results["env"]))
    colors = experiment_colors(list(dict.fromkeys(results["experiment"])))
    figure, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    for axis, env in zip(axes[0], envs, strict=True):
        for experiment, group in results[results["env"] == env].groupby("experiment"):
            axis.errorbar(
                group["steps"],
                group["mean_return"],
                yerr=group["ci95"],
                marker="o",
                capsize=4,
                label=experiment,
                color=colors[experiment],
            )
        axis.set_title(f"{env}: return after adaptation")
        axis.set_xlabel("policy-gradient adaptation steps")
        axis.set_ylabel("mean return on held-out tasks")
        axis.set_xticks(sorted(results["steps"].unique()))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return _save(figure, path)
