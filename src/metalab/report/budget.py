"""Budget curves: validation accuracy against training seconds for every learner
(plots/budget.png, one panel per learner family as in training_loss.png), and which
learners were still improving when their budget ended.

The seconds are the curve's `seconds` column (busy seconds of the train loop, validation
excluded, as the summary's training_seconds). Curves written before that column existed
get (iteration + 1) x training_seconds / iterations from metrics/train/<name>.json (an even
pace; the figure says which learners that is).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.ticker
import numpy as np
import pandas as pd

from metalab.records import TrainSummary
from metalab.report.collect import ExperimentRecord, ReportInputs
from metalab.report.plots import (
    Style,
    _empty,
    _round_ticks,
    _save,
    experiment_styles,
    family_panels,
    plt,
)


def validation_points(
    curve: pd.DataFrame | None, train: TrainSummary | None
) -> tuple[pd.DataFrame | None, bool]:
    """(validation rows of a training curve as columns `seconds`, `accuracy` [fraction],
    whether the seconds are estimated); (None, False) without validation rows or any time.

    A row's `iteration` is the step's index, so (iteration + 1) steps are done at it.
    """
    if curve is None or "validation_accuracy" not in curve:
        return None, False
    rows = curve[curve["validation_accuracy"].notna()]
    if rows.empty:
        return None, False
    if "seconds" in rows and rows["seconds"].notna().all():
        seconds, estimated = rows["seconds"].to_numpy(dtype=float), False
    elif train is not None and train.iterations > 0:
        steps = rows["iteration"].to_numpy(dtype=float) + 1
        seconds, estimated = steps * train.training_seconds / train.iterations, True
    else:
        return None, False
    points = pd.DataFrame(
        {"seconds": seconds, "accuracy": rows["validation_accuracy"].to_numpy(dtype=float)}
    )
    return points, estimated


def still_improving(curve: pd.DataFrame | None) -> bool | None:
    """Whether the best validation accuracy is at the last validation point (strictly
    above every earlier one, as the train loop keeps the first best); None with fewer
    than two validation points."""
    if curve is None or "validation_accuracy" not in curve:
        return None
    accuracy = curve["validation_accuracy"].dropna().to_numpy(dtype=float)
    if accuracy.size < 2:
        return None
    return int(np.argmax(accuracy)) == accuracy.size - 1


def budget_markdown(inputs: ReportInputs) -> str:
    """The report's budget section: the learners still improving at the end of their
    budget (own runs; extra seeds named apart) and where the curves are."""
    judged = {name: still_improving(r.curve) for name, r in inputs.experiments.items()}
    judged = {name: flag for name, flag in judged.items() if flag is not None}
    improving = [name for name, flag in judged.items() if flag]
    listed = ", ".join(improving) if improving else "none"
    figure = "`plots/budget.png` draws validation accuracy against training seconds."
    if not judged:
        return f"## Budget\n\nNo learner has two or more validation points. {figure}"
    lines = [
        "## Budget",
        "Still improving when the budget ends (best validation accuracy at the last "
        f"validation point): {listed} ({len(improving)} of {len(judged)} learners with a "
        f"validation curve). {figure}",
    ]
    seeds = [
        run.name
        for record in inputs.experiments.values()
        for run in record.seed_runs
        if still_improving(run.curve)
    ]
    if seeds:
        lines[-1] += f" Extra seeds still improving: {', '.join(seeds)}."
    return "\n\n".join(lines)


def plot_budget(
    inputs: ReportInputs,
    path: str | Path,
    styles: dict[str, Style] | None = None,
) -> Path:
    """Write `budget_figure` (or a note when no learner has a validation curve)."""
    path = Path(path)
    if not any(validation_points(r.curve, r.train)[0] is not None for r in _runs(inputs)):
        return _empty(path, "Validation accuracy vs training time", "no validation curves")
    return _save(budget_figure(inputs, styles), path)


def _runs(inputs: ReportInputs) -> list[ExperimentRecord]:
    return [run for record in inputs.experiments.values() for run in record.runs]


def budget_figure(inputs: ReportInputs, styles: dict[str, Style] | None = None) -> plt.Figure:
    """Validation accuracy (%) vs training seconds: a panel per learner family
    (`family_panels`), each learner in its `experiment_styles` look, its own run with
    markers and its extra seeds as thin lines of the same look; a star on each run's best
    point. Learners still improving at the end are marked ↑ in the legends."""
    points = {}
    estimated = []
    for record in inputs.experiments.values():
        for run in record.runs:
            frame, guessed = validation_points(run.curve, run.train)
            if frame is not None:
                points[run.name] = frame
                if guessed:
                    estimated.append(run.name)
    names = [name for name in inputs.experiments if name in points]
    algorithms = {name: inputs.experiments[name].algorithm for name in inputs.experiments}
    if styles is None or not all(name in styles for name in names):
        styles = experiment_styles(list(inputs.experiments), algorithms)
    panels = family_panels(names, algorithms)
    seconds = np.concatenate([frame["seconds"].to_numpy() for frame in points.values()])
    figure, grid = plt.subplots(
        len(panels),
        1,
        figsize=(10, 1.0 + 2.7 * len(panels)),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for axes, (title, members) in zip(grid[:, 0], panels, strict=True):
        for name in members:
            record = inputs.experiments[name]
            color, linestyle = styles[name]
            label = name + (" ↑" if still_improving(record.curve) else "")
            if record.seed_runs:
                count = len(record.seed_runs)
                label += f" (+{count} seed{'s' if count > 1 else ''})"
            for run in record.runs:
                frame = points.get(run.name)
                if frame is None:
                    continue
                own = run is record
                x, y = frame["seconds"], 100 * frame["accuracy"]
                axes.plot(
                    x,
                    y,
                    color=color,
                    linestyle=linestyle,
                    linewidth=1.5 if own else 0.8,
                    alpha=1.0 if own else 0.6,
                    marker="o" if own else None,
                    markersize=3,
                    label=label if own else "_seed",
                )
                best = int(np.argmax(frame["accuracy"].to_numpy()))
                axes.plot(x.iloc[best], y.iloc[best], marker="*", color=color, markersize=9)
        axes.set_title(title, loc="left", fontsize=10)
        axes.set_ylabel("validation acc. (%)")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    if seconds.min() > 0 and seconds.max() / seconds.min() > 10:
        axes = grid[-1, 0]  # the x axis is shared: plain round numbers on a log scale
        axes.set_xscale("log")
        axes.set_xticks(_round_ticks(seconds.min(), seconds.max()))
        axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    grid[-1, 0].set_xlabel("training seconds (busy time of the train loop)")
    title = (
        "Validation accuracy vs training time; ★ best point, ↑ best at the last point "
        "(still improving when the budget ends)"
    )
    if estimated:
        which = "every curve" if len(estimated) == len(points) else ", ".join(estimated)
        title += (
            f"\nseconds estimated as steps × training_seconds / iterations for {which} "
            "(no `seconds` column in the curve)"
        )
    figure.suptitle(title, fontsize=10)
    return figure
