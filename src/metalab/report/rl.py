"""The meta-RL part of the report: a table of held-out returns before and after
adaptation, and a plot of return vs adaptation steps per learner (one panel per env,
since returns are not comparable across environments).

The step counts (columns of the table, points of the plot) are whatever the evaluations
measured (`RLEvaluationMetrics.returns`), any number of them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from metalab.records import RLEvaluationMetrics, RLTrainSummary, metrics_files
from metalab.report.collect import read_record
from metalab.report.plots import _empty, _save, experiment_colors, plt
from metalab.report.tables import durations, markdown_table, number

RESULT_COLUMNS = [
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
        for steps, result in evaluation.returns.items():
            rows.append(
                {
                    "experiment": evaluation.experiment,
                    "algorithm": evaluation.algorithm,
                    "env": evaluation.env,
                    "steps": steps,
                    "mean_return": result.mean_return,
                    "ci95": result.ci95,
                    **cost,
                }
            )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).sort_values(["env", "experiment", "steps"])


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
