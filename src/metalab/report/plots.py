"""The report's PNG figures (matplotlib, Agg backend: no display needed).

Each function draws one figure from the comparison table (or the training curves) and
writes it atomically; an experiment without the numbers a figure needs is left out of
that figure, and a figure with nothing to show says so instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from metalab.io import atomic_output  # noqa: E402
from metalab.report.tables import setting_column  # noqa: E402

DPI = 120


def experiment_colors(names: list[str]) -> dict[str, tuple]:
    """One colour per experiment (tab10, tab20 beyond ten); pass the same mapping to every
    figure so that an experiment has the same colour in all of them."""
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _colors(names: list[str], colors: dict[str, tuple] | None) -> dict[str, tuple]:
    if colors is not None and all(name in colors for name in names):
        return colors
    return experiment_colors(names)


def _save(figure: plt.Figure, path: Path) -> Path:
    try:
        with atomic_output(path) as handle:
            figure.savefig(handle, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def _empty(path: Path, title: str, message: str) -> Path:
    figure, axes = plt.subplots(figsize=(6, 2.5))
    axes.set_axis_off()
    axes.set_title(title)
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
    return _save(figure, path)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (shorter at the start): [n] -> [n]."""
    if window <= 1 or values.size == 0:
        return values
    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


def plot_training_loss(
    curves: dict[str, pd.DataFrame], path: str | Path, colors: dict[str, tuple] | None = None
) -> Path:
    """Meta-training loss vs iteration of every experiment, overlaid (moving average)."""
    path = Path(path)
    curves = {name: c for name, c in curves.items() if c is not None and not c.empty}
    if not curves:
        return _empty(path, "Meta-training loss", "no training curves (plots/train/*.csv)")
    colors = _colors(list(curves), colors)
    figure, axes = plt.subplots(figsize=(9, 5.5))
    positive = True
    for name, curve in curves.items():
        loss = curve["loss"].to_numpy(dtype=float)
        window = max(1, len(loss) // 50)
        label = name if window == 1 else f"{name} (mean of {window})"
        axes.plot(curve["iteration"], smooth(loss, window), label=label, color=colors[name])
        positive = positive and bool(np.nanmin(loss) > 0)
    if positive:
        axes.set_yscale("log")
    axes.set_xlabel("meta-iteration")
    axes.set_ylabel("meta-training loss (query cross-entropy)")
    axes.set_title("Meta-training loss")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return _save(figure, path)


def plot_accuracy(
    table: pd.DataFrame,
    settings: list[str],
    path: str | Path,
    colors: dict[str, tuple] | None = None,
) -> Path:
    """Accuracy after adaptation with 95% error bars, one panel per setting, one bar per
    experiment (table order); crosses mark accuracy before adaptation."""
    path = Path(path)
    known = [s for s in settings if table[setting_column(s, "accuracy")].notna().any()]
    if not known or table.empty:
        return _empty(path, "Meta-test accuracy", "no evaluation results (metrics/eval/*.json)")
    names = list(table["experiment"])
    positions = np.arange(len(names))
    colors = _colors(names, colors)
    height = max(2.5, 0.38 * len(names) + 1.4)
    figure, panels = plt.subplots(
        1, len(known), figsize=(3.6 * len(known) + 2, height), sharey=True, squeeze=False
    )
    for axes, setting in zip(panels[0], known, strict=True):
        accuracy = 100 * table[setting_column(setting, "accuracy")].to_numpy(dtype=float)
        ci95 = 100 * table[setting_column(setting, "ci95")].fillna(0).to_numpy(dtype=float)
        before = 100 * table[setting_column(setting, "accuracy_before")].to_numpy(dtype=float)
        present = ~np.isnan(accuracy)
        axes.barh(
            positions[present],
            accuracy[present],
            xerr=ci95[present],
            color=[colors[n] for n, p in zip(names, present, strict=True) if p],
            capsize=3,
            label="after adaptation (95% CI)",
        )
        if (~np.isnan(before)).any():
            axes.scatter(before, positions, marker="x", color="black", zorder=3, label="before")
        for position in positions[~present]:
            axes.text(1, position, "not evaluated", va="center", fontsize=8, color="grey")
        axes.set_xlim(0, 100)
        axes.set_title(setting)
        axes.set_xlabel("accuracy (%)")
        axes.grid(True, axis="x", alpha=0.3)
    panels[0][0].set_yticks(positions, names)
    panels[0][0].invert_yaxis()  # table order (best first) from the top
    handles, labels = panels[0][-1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.02))
    figure.suptitle("Meta-test accuracy per setting")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(figure, path)


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Mask [n] of the points no other point beats: none has cost <= and value >= with
    one of them strict (lower cost and higher value are better)."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    front = np.zeros(cost.size, dtype=bool)
    for i in range(cost.size):
        dominated = (
            (cost <= cost[i]) & (value >= value[i]) & ((cost < cost[i]) | (value > value[i]))
        )
        front[i] = not dominated.any()
    return front


def plot_pareto(table: pd.DataFrame, setting: str, path: str | Path) -> Path:
    """Accuracy (`setting`) vs training time, the Pareto-optimal experiments joined."""
    path = Path(path)
    title = f"Accuracy vs training time ({setting})"
    accuracy_column = setting_column(setting, "accuracy")
    if accuracy_column not in table:
        return _empty(path, title, f"no {setting} results")
    rows = table[table[accuracy_column].notna() & table["training_seconds"].notna()]
    if rows.empty:
        return _empty(path, title, "no experiment has both a training time and an accuracy")
    seconds = rows["training_seconds"].to_numpy(dtype=float)
    accuracy = 100 * rows[accuracy_column].to_numpy(dtype=float)
    ci95 = 100 * rows[setting_column(setting, "ci95")].fillna(0).to_numpy(dtype=float)
    front = pareto_front(seconds, accuracy)
    figure, axes = plt.subplots(figsize=(8.5, 5.5))
    axes.errorbar(seconds, accuracy, yerr=ci95, fmt="none", ecolor="grey", capsize=3)
    axes.scatter(seconds[~front], accuracy[~front], color="tab:blue", label="dominated", zorder=3)
    axes.scatter(
        seconds[front], accuracy[front], color="tab:red", marker="D", label="Pareto front", zorder=4
    )
    order = np.argsort(seconds[front])
    axes.step(
        seconds[front][order], accuracy[front][order], where="post", color="tab:red", alpha=0.6
    )
    for name, x, y in zip(rows["experiment"], seconds, accuracy, strict=True):
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if seconds.min() > 0 and seconds.max() / seconds.min() > 20:
        axes.set_xscale("log")
    axes.set_xlabel("training time (s, busy time of the train loop)")
    axes.set_ylabel(f"{setting} accuracy after adaptation (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_speed_memory(
    table: pd.DataFrame, path: str | Path, colors: dict[str, tuple] | None = None
) -> Path:
    """Meta-training throughput (tasks/s) and peak memory per experiment, as bars."""
    path = Path(path)
    if table.empty or not table[["tasks_per_s", "peak_memory_mb"]].notna().any().any():
        return _empty(path, "Speed and memory", "no training metrics (metrics/train/*.json)")
    names = list(table["experiment"])
    positions = np.arange(len(names))
    bar_colors = [_colors(names, colors)[n] for n in names]
    figure, (speed, memory) = plt.subplots(
        1, 2, figsize=(11, max(2.5, 0.38 * len(names) + 1.4)), sharey=True
    )
    for axes, column, label in (
        (speed, "tasks_per_s", "meta-training tasks per second"),
        (memory, "peak_memory_mb", "peak memory during training (MB)"),
    ):
        values = table[column].to_numpy(dtype=float)
        axes.barh(positions, np.nan_to_num(values), color=bar_colors)
        for position, value in zip(positions, values, strict=True):
            if np.isnan(value):
                axes.text(0, position, " unknown", va="center", fontsize=8, color="grey")
        axes.set_xlabel(label)
        axes.grid(True, axis="x", alpha=0.3)
    speeds = table["tasks_per_s"].dropna().to_numpy(dtype=float)
    if speeds.size > 1 and speeds.min() > 0 and speeds.max() / speeds.min() > 30:
        speed.set_xscale("log")  # learners differ by orders of magnitude in cost
    speed.set_yticks(positions, names)
    speed.invert_yaxis()
    speed.set_title("Throughput")
    memory.set_title("Peak memory")
    figure.suptitle("Training speed and memory")
    figure.tight_layout()
    return _save(figure, path)
