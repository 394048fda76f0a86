"""The meta-RL part of the report: a table of held-out returns before and after
adaptation, and a plot of return vs adaptation steps per learner (one panel per env,
since returns are not comparable across environments).

Each evaluation file is one training seed of an experiment (`RLEvaluationMetrics.seed`;
all seeds on the same held-out tasks). An experiment's rows aggregate its seeds: the mean
over seeds of the per-seed mean return, the spread between seeds as their standard
deviation (ddof=1) and their min and max, and the mean over seeds of the per-seed 95% CI
over tasks. The step counts (columns of the table, points of the plot) are whatever the
evaluations measured, any number of them. A learner's returns after more steps than it
took per task in meta-training are marked (`beyond_training`; `*` in the table, hollow
markers in the plot), and its headline gain is at the step count it was trained for.
Reference policies evaluated on the same tasks (random initialisation, oracle;
`RLEvaluationMetrics.references`) and the joint policy-gradient ("pretrained")
experiments are rows of their own (`policy` column; grey and dashed in the plot); a
reference repeated by several experiments with identical returns at every seed appears
once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from metalab.records import META_LEARNED, RLEvaluationMetrics, RLTrainSummary, metrics_files
from metalab.report.collect import read_record
from metalab.report.plots import _empty, _save, experiment_colors, plt
from metalab.report.tables import durations, markdown_table, number

PRETRAINED = "pretrained"  # the `policy` of a joint policy-gradient experiment's own rows
JOINT_PG = "joint_pg"

RESULT_COLUMNS = [
    "experiment",
    "policy",
    "algorithm",
    "env",
    "steps",
    "seeds",
    "mean_return",
    "seed_std",
    "seed_min",
    "seed_max",
    "ci95",
    "trained_steps",
    "beyond_training",
    "training_seconds",
    "tasks_per_s",
    "peak_memory_mb",
]
_COST = ("training_seconds", "tasks_per_s", "peak_memory_mb")
# (colour, marker) of the reference lines in the plot
_REFERENCE_STYLES = {"oracle": ("0.35", "s"), PRETRAINED: ("0.1", "D")}
_DEFAULT_REFERENCE_STYLE = ("0.6", "^")


def _seed_runs(metrics_dir: Path, notes: list[str] | None) -> list[dict]:
    """One entry per (evaluation file, policy): its seed, returns and training cost."""
    runs = []
    for path in metrics_files(metrics_dir / "eval_rl"):
        evaluation = read_record(RLEvaluationMetrics, path, notes)
        if evaluation is None:
            continue
        training = read_record(RLTrainSummary, metrics_dir / "train_rl" / path.name, notes)
        cost = {name: getattr(training, name, None) for name in _COST}
        learner = PRETRAINED if evaluation.algorithm == JOINT_PG else META_LEARNED
        policies = {learner: evaluation.returns, **evaluation.references}
        for policy, returns in policies.items():
            runs.append(
                {
                    "experiment": evaluation.experiment,
                    "policy": policy,
                    "algorithm": evaluation.algorithm,
                    "env": evaluation.env,
                    "seed": evaluation.seed,
                    "returns": returns,
                    "trained_steps": evaluation.trained_steps,
                    **(cost if policy == learner else dict.fromkeys(_COST)),
                }
            )
    return runs


def _without_repeated_references(runs: list[dict]) -> list[dict]:
    """Drop a reference of an experiment whose returns, seed by seed, an earlier
    experiment's same reference already has (the oracle of every navigation experiment,
    the random initialisation shared by learners of one architecture)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["experiment"], run["policy"]), []).append(run)
    seen: set[tuple] = set()
    kept = []
    for (_, policy), group in groups.items():
        if policy not in (META_LEARNED, PRETRAINED):
            signature = (
                group[0]["env"],
                policy,
                tuple(
                    sorted(
                        (
                            str(run["seed"]),
                            tuple((s, r.mean_return) for s, r in run["returns"].items()),
                        )
                        for run in group
                    )
                ),
            )
            if signature in seen:
                continue
            seen.add(signature)
        kept += group
    return kept


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else None


def rl_results(metrics_dir: str | Path, notes: list[str] | None = None) -> pd.DataFrame:
    """One row per (experiment, policy, adaptation steps), aggregated over training seeds,
    from metrics/{eval_rl,train_rl}/*.json.

    Columns `RESULT_COLUMNS`: `seeds` (how many), `mean_return` (mean over seeds), the
    spread between seeds `seed_std` (ddof=1; NaN for one seed), `seed_min`, `seed_max`,
    `ci95` (mean over seeds of the 95% CI over tasks), and the training figures (means
    over seeds; None without a training summary) on a learner's rows.

    A file that is not a valid RL evaluation or training summary raises
    `MetricsFileError`; given `notes`, it is left out instead and the note says why.
    """
    runs = _without_repeated_references(_seed_runs(Path(metrics_dir), notes))
    rows = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["experiment"], run["policy"]), []).append(run)
    for (experiment, policy), group in groups.items():
        first = group[0]
        trained = first["trained_steps"]
        steps_seen = sorted({steps for run in group for steps in run["returns"]})
        for steps in steps_seen:
            results = [run["returns"][steps] for run in group if steps in run["returns"]]
            means = np.array([result.mean_return for result in results])
            rows.append(
                {
                    "experiment": experiment,
                    "policy": policy,
                    "algorithm": first["algorithm"],
                    "env": first["env"],
                    "steps": steps,
                    "seeds": len(results),
                    "mean_return": float(means.mean()),
                    "seed_std": float(means.std(ddof=1)) if len(means) > 1 else float("nan"),
                    "seed_min": float(means.min()),
                    "seed_max": float(means.max()),
                    "ci95": float(np.mean([result.ci95 for result in results])),
                    "trained_steps": trained,
                    "beyond_training": policy == META_LEARNED
                    and trained is not None
                    and steps > trained,
                    **{name: _mean([run[name] for run in group]) for name in _COST},
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
    if policy == PRETRAINED:
        return f"reference: pretrained, joint policy gradient ({experiment})"
    return f"reference: {policy.replace('_', ' ')} ({experiment})"


def _steps_label(steps: int) -> str:
    return f"{steps} step{'s' if steps > 1 else ''}"


def headline_steps(policy: str, trained_steps: float | None, evaluated: list[int]) -> int | None:
    """The step count a row's gain is quoted at: a learner's trained step count when it was
    evaluated there (Reptile-RL: its 3 inner steps), else the fewest adaptation steps."""
    positive = [steps for steps in evaluated if steps > 0]
    if policy == META_LEARNED and trained_steps is not None and not pd.isna(trained_steps):
        if int(trained_steps) in positive:
            return int(trained_steps)
    return positive[0] if positive else None


def _cell(row: pd.Series) -> str:
    """'mean ± CI over tasks', then '[min, max]' between seeds when there are several."""
    text = f"{row['mean_return']:.2f} ± {row['ci95']:.2f}"
    if row["seeds"] > 1:
        text += f" [{row['seed_min']:.2f}, {row['seed_max']:.2f}]"
    return text + ("*" if bool(row["beyond_training"]) else "")


def rl_markdown(results: pd.DataFrame) -> str:
    """The RL table: one row per experiment and policy, the return per evaluated step count
    (mean over seeds ± 95% CI over tasks [min, max between seeds]), the gain at the
    headline step count over none, and the training cost (mean over seeds)."""
    if results.empty:
        return "## Meta-RL\n\nNo RL evaluations found (metrics/eval_rl/).\n"
    steps = sorted(results["steps"].unique())
    header = ["experiment", "env", "seeds"]
    header += ["before" if s == 0 else f"after {_steps_label(s)}" for s in steps]
    header += ["gain (at steps)", "training", "tasks/s", "peak MB"]
    rows = []
    groups = list(results.groupby(["experiment", "policy", "env"], sort=False))
    training_times = durations(group.iloc[0]["training_seconds"] for _, group in groups)
    for ((experiment, policy, env), group), training_time in zip(
        groups, training_times, strict=True
    ):
        by_step = group.set_index("steps")
        first = group.iloc[0]
        cells = [row_label(experiment, policy), env, str(int(by_step["seeds"].max()))]
        cells += [_cell(by_step.loc[s]) if s in by_step.index else "-" for s in steps]
        headline = headline_steps(policy, first["trained_steps"], list(by_step.index))
        if headline is not None and 0 in by_step.index:
            gain = by_step.loc[headline, "mean_return"] - by_step.loc[0, "mean_return"]
            cells.append(f"{gain:+.2f} ({headline})")
        else:
            cells.append("-")
        cells += [
            training_time,
            number(first["tasks_per_s"], 1),
            number(first["peak_memory_mb"]),
        ]
        rows.append(cells)
    notes = (
        "Return: mean over training seeds ± 95% CI over tasks (mean over seeds), "
        "[min, max] between seeds. Gain: over no adaptation, after the number of steps in "
        "brackets (a learner's meta-training inner steps; references: one step).\n"
    )
    if results["beyond_training"].astype(bool).any():
        notes += "\n* more adaptation steps than the learner took per task in meta-training.\n"
    return (
        "## Meta-RL: return on held-out tasks\n\n"
        + markdown_table(header, rows, "ll" + "r" * (len(header) - 2))
        + "\n\n"
        + notes
    )


def plot_rl_adaptation(results: pd.DataFrame, path: str | Path) -> Path:
    """Return vs adaptation steps, one line per experiment and policy: the mean over
    training seeds, with a band from the lowest to the highest seed (error bars of the 95%
    CI over tasks when there is one seed)."""
    path = Path(path)
    if results.empty:
        return _empty(path, "Meta-RL adaptation", "no RL evaluations yet")
    envs = list(dict.fromkeys(results["env"]))
    learners = results[results["policy"] == META_LEARNED]
    colors = experiment_colors(list(dict.fromkeys(learners["experiment"])))
    figure, axes = plt.subplots(1, len(envs), figsize=(6.5 * len(envs), 4.5), squeeze=False)
    for axis, env in zip(axes[0], envs, strict=True):
        in_env = results[results["env"] == env]
        for (experiment, policy), group in in_env.groupby(["experiment", "policy"], sort=False):
            reference = policy != META_LEARNED
            if reference:
                color, marker = _REFERENCE_STYLES.get(policy, _DEFAULT_REFERENCE_STYLE)
            else:
                color, marker = colors[experiment], "o"
            seeds = int(group["seeds"].max())
            label = row_label(experiment, policy) + (f" ({seeds} seeds)" if seeds > 1 else "")
            style = dict(color=color, linestyle="--" if reference else "-", marker=marker)
            if seeds > 1:
                axis.plot(group["steps"], group["mean_return"], label=label, **style)
                axis.fill_between(
                    group["steps"], group["seed_min"], group["seed_max"], color=color, alpha=0.15
                )
            else:
                axis.errorbar(
                    group["steps"],
                    group["mean_return"],
                    yerr=group["ci95"],
                    capsize=4,
                    label=label,
                    **style,
                )
            beyond = group[group["beyond_training"].astype(bool)]
            if not reference and not beyond.empty:
                axis.plot(
                    beyond["steps"],
                    beyond["mean_return"],
                    "o",
                    markerfacecolor="white",
                    color=color,
                )
        axis.set_title(f"{env}: return after adaptation")
        axis.set_xlabel("policy-gradient adaptation steps")
        axis.set_ylabel("mean return on held-out tasks")
        axis.set_xticks(sorted(results["steps"].unique()))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small")
    figure.suptitle(
        "lines: mean over training seeds; bands: lowest to highest seed; "
        "hollow: beyond the trained steps",
        fontsize="small",
    )
    figure.tight_layout()
    return _save(figure, path)
