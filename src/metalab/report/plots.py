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

# Learner families (by `algorithm`): the training-loss figure draws one panel per family,
# so that a panel holds a few curves that are worth comparing. An algorithm not listed
# here is a family of its own.
FAMILIES = {
    "maml": "MAML core (MAML, FOMAML, Meta-SGD, MAML++, ANIL)",
    "taml": "TAML",
    # Its own family: next to TAML's few runs it shares their panel ("TAML · ...").
    "anil_task_encoder": "ANIL with a task encoder",
    "reptile": "other gradient-based",
    "cavia": "other gradient-based",
    "leo": "other gradient-based",
    "protonets": "metric- and model-based",
    "generated_head": "metric- and model-based",
    "film_prototypes": "metric- and model-based",
    # The seed's names of the two designs above, as metrics recorded before the renaming
    # carry them (the same figure from those files).
    "metanets": "metric- and model-based",
    "metanets_embedding": "metric- and model-based",
}
PANEL_LINES = 7  # at most this many curves in one panel (fewer than the 9 hues)
# tab10 without its grey (the colour of the context curves): 9 hues x 3 shades give 27
# colours; past them the line style changes.
HUES = tuple(c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7)
SHADES = (0.0, 0.35, -0.3)  # >0: towards white, <0: towards black
LINESTYLES = ("-", "--", ":", "-.")

CONTEXT_GREY = "0.88"  # the other panels' curves, behind a panel's own
Style = tuple[tuple[float, float, float], str]  # (RGB colour, matplotlib line style)


def learner_family(algorithm: str | None) -> str:
    """The family of an algorithm (`FAMILIES`; the algorithm itself if it has none)."""
    if not algorithm:
        return "unknown algorithm"
    return FAMILIES.get(algorithm, algorithm)


def family_panels(
    names: list[str], algorithms: dict[str, str | None] | None = None, size: int = PANEL_LINES
) -> list[tuple[str, list[str]]]:
    """[(title, names)]: the experiments grouped by learner family (families in order of
    first appearance, `names` order within one), at most `size` per group. A larger
    family is cut into near-equal consecutive parts ("title, part 1 of 2", ...); neighbouring
    small families share a group ("A · B") while they fit."""
    algorithms = algorithms or {}
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(learner_family(algorithms.get(name)), []).append(name)
    blocks: list[tuple[str, list[str], bool]] = []  # (title, names, is a part)
    for family, members in families.items():
        parts = -(-len(members) // size)
        if parts == 1:
            blocks.append((family, members, False))
            continue
        cuts = np.linspace(0, len(members), parts + 1).round().astype(int)
        for i in range(parts):
            title = f"{family}, part {i + 1} of {parts}"
            blocks.append((title, members[cuts[i] : cuts[i + 1]], True))
    panels: list[tuple[str, list[str], bool]] = []
    for title, members, part in blocks:
        if panels and not part and not panels[-1][2]:
            last_title, last_members, _ = panels[-1]
            if len(last_members) + len(members) <= size:
                panels[-1] = (f"{last_title} · {title}", last_members + members, False)
                continue
        panels.append((title, members, part))
    return [(title, members) for title, members, _ in panels]


def _shade(color: tuple[float, ...], amount: float) -> tuple[float, float, float]:
    rgb = np.asarray(color[:3], dtype=float)
    target = 1.0 if amount > 0 else 0.0
    return tuple(float(c) for c in rgb + abs(amount) * (target - rgb))


def experiment_styles(
    names: list[str], algorithms: dict[str, str | None] | None = None
) -> dict[str, Style]:
    """A (colour, line style) per experiment, no two alike (for up to 108 experiments):
    the experiments in `family_panels` order take the 9 `HUES` in turn, so the curves of
    one panel all differ in hue; each further round of 9 uses a lighter or a darker
    shade, and after 27 another line style. Pass the same mapping to every
    figure so that an experiment looks the same in all of them."""
    order = [name for _, members in family_panels(names, algorithms) for name in members]
    styles = {}
    for i, name in enumerate(order):
        hue = HUES[i % len(HUES)]
        shade = SHADES[(i // len(HUES)) % len(SHADES)]
        linestyle = LINESTYLES[(i // (len(HUES) * len(SHADES))) % len(LINESTYLES)]
        styles[name] = (_shade(hue, shade), linestyle)
    return styles


def experiment_colors(
    names: list[str], algorithms: dict[str, str | None] | None = None
) -> dict[str, tuple]:
    """The colour of each experiment in `experiment_styles` (all distinct for up to 27)."""
    return {name: color for name, (color, _) in experiment_styles(names, algorithms).items()}


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


def _smoothed(curve: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """(iterations, loss averaged over the last ~2% of the run's iterations, window)."""
    loss = curve["loss"].to_numpy(dtype=float)
    window = max(1, len(loss) // 50)
    return curve["iteration"].to_numpy(dtype=float), smooth(loss, window), window


def plot_training_loss(
    curves: dict[str, pd.DataFrame],
    path: str | Path,
    styles: dict[str, Style] | None = None,
    algorithms: dict[str, str | None] | None = None,
) -> Path:
    """Write `training_loss_figure` (or a note when there is no curve) to `path`."""
    path = Path(path)
    curves = {name: c for name, c in curves.items() if c is not None and not c.empty}
    if not curves:
        return _empty(path, "Meta-training loss", "no training curves (plots/train/*.csv)")
    return _save(training_loss_figure(curves, styles, algorithms), path)


def training_loss_figure(
    curves: dict[str, pd.DataFrame],
    styles: dict[str, Style] | None = None,
    algorithms: dict[str, str | None] | None = None,
) -> plt.Figure:
    """Meta-training loss vs iteration (moving average) of the (non-empty) `curves`: one
    panel per learner family (`family_panels`: at most `PANEL_LINES` curves, each with
    its `experiment_styles` look), each with its legend beside it; the same axes in every
    panel and the other panels' curves in light grey behind, for comparison."""
    if styles is None or not all(name in styles for name in curves):
        styles = experiment_styles(list(curves), algorithms)
    panels = family_panels(list(curves), algorithms)
    smoothed = {name: _smoothed(curve) for name, curve in curves.items()}
    positive = all(bool(np.nanmin(c["loss"].to_numpy(dtype=float)) > 0) for c in curves.values())
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
        for name, (x, y, _) in smoothed.items():
            if name not in members:
                axes.plot(x, y, color=CONTEXT_GREY, linewidth=0.8, zorder=1)
        for name in members:
            x, y, _ = smoothed[name]
            color, linestyle = styles[name]
            axes.plot(x, y, color=color, linestyle=linestyle, linewidth=1.5, label=name, zorder=2)
        if positive:
            axes.set_yscale("log")
        axes.set_title(title, loc="left", fontsize=10)
        axes.set_ylabel("loss")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    grid[-1, 0].set_xlabel("meta-iteration")
    smoothing = (
        "raw values"
        if all(window == 1 for _, _, window in smoothed.values())
        else "each a trailing mean over 1/50 of its run"
    )
    title = f"Meta-training loss (query cross-entropy), {smoothing}"
    if len(panels) > 1:
        title += "\ngrey: the experiments of the other panels"
    figure.suptitle(title)
    return figure


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
    # a grey bar in the legend: the bars' colours only tell the experiments apart
    handles = [
        matplotlib.patches.Patch(color="0.6", label="after adaptation (95% CI)"),
        matplotlib.lines.Line2D(
            [], [], marker="x", color="black", linestyle="none", label="before adaptation"
        ),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0))
    figure.suptitle("Meta-test accuracy per setting")
    figure.tight_layout(rect=(0, 0.45 / height, 1, 1))
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


def _round_ticks(low: float, high: float) -> list[float]:
    """Round numbers (1, 1.5, 2, 3, 5, 7 x a power of ten) from `low` to `high`, for a
    log axis."""
    ticks = []
    for power in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1):
        for mantissa in (1, 1.5, 2, 3, 5, 7):
            tick = mantissa * 10.0**power
            if low * 0.95 <= tick <= high * 1.05:
                ticks.append(tick)
    return ticks


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
    figure, axes = plt.subplots(figsize=(10, 6.5) if len(rows) > 10 else (8.5, 5.5))
    axes.errorbar(seconds, accuracy, yerr=ci95, fmt="none", ecolor="0.7", capsize=2)
    axes.scatter(seconds[~front], accuracy[~front], color="tab:blue", label="dominated", zorder=3)
    axes.scatter(
        seconds[front], accuracy[front], color="tab:red", marker="D", label="Pareto front", zorder=4
    )
    order = np.argsort(seconds[front])
    axes.step(
        seconds[front][order], accuracy[front][order], where="post", color="tab:red", alpha=0.6
    )
    if seconds.min() > 0 and seconds.max() / seconds.min() > 3:
        axes.set_xscale("log")  # spreads the many short runs; plain numbers on the axis
        axes.set_xticks(_round_ticks(seconds.min(), seconds.max()))
        axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("training time (s, busy time of the train loop)")
    axes.set_ylabel(f"{setting} accuracy after adaptation (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    # front first: its names get the places next to their points
    order = np.argsort(~front, kind="stable")
    label_points(
        axes,
        seconds[order],
        accuracy[order],
        list(rows["experiment"].to_numpy()[order]),
        bold=front[order],
    )
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


# Where a point's name may go: directions (degrees; right and left first) and distances
# (points) from the point; a name placed beyond the first distance is joined to its point.
LABEL_ANGLES = (0, 180, 90, 270, 30, 150, 210, 330, 60, 120, 240, 300)
LABEL_DISTANCES = (6, 12, 20, 30, 42, 56)


def _overlap(a: matplotlib.transforms.Bbox, b: matplotlib.transforms.Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def label_points(
    axes: plt.Axes,
    xs: np.ndarray,
    ys: np.ndarray,
    labels: list[str],
    bold: np.ndarray | None = None,
    fontsize: float = 8,
) -> list[plt.Annotation]:
    """Name each point so that no two names overlap, nor a name a point or the legend:
    each name (in the given order) takes the first free place, nearest first, inside
    the axes (`LABEL_ANGLES` x `LABEL_DISTANCES`), else the place it overlaps least.
    Call when the axes' data, scales and legend are final. Returns the annotations."""
    figure = axes.figure
    figure.canvas.draw()  # settles the axes' limits (autoscaling) and the legend
    renderer = figure.canvas.get_renderer()
    pixels = figure.dpi / 72
    points = axes.transData.transform(np.column_stack([xs, ys]))
    radius = 4.5 * pixels  # a marker
    taken = [
        matplotlib.transforms.Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
        for x, y in points
    ]
    legend = axes.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    inside = axes.get_window_extent(renderer)
    annotations = []
    for i, (label, (px, py)) in enumerate(zip(labels, points, strict=True)):
        weight = "bold" if bold is not None and bold[i] else "normal"
        size = axes.text(0, 0, label, fontsize=fontsize, fontweight=weight)
        box = size.get_window_extent(renderer)
        width, height = box.width + 2, box.height + 2
        size.remove()
        best = None  # (overlap, offset, alignment)
        for distance in LABEL_DISTANCES:
            for angle in LABEL_ANGLES:
                dx = distance * np.cos(np.radians(angle))
                dy = distance * np.sin(np.radians(angle))
                ha = "left" if dx > 1e-6 else "right" if dx < -1e-6 else "center"
                va = "bottom" if dy > 1e-6 else "top" if dy < -1e-6 else "center"
                x0 = px + dx * pixels - {"left": 0, "center": width / 2, "right": width}[ha]
                y0 = py + dy * pixels - {"bottom": 0, "center": height / 2, "top": height}[va]
                place = matplotlib.transforms.Bbox.from_bounds(x0, y0, width, height)
                outside = (
                    place.x0 < inside.x0
                    or place.x1 > inside.x1
                    or place.y0 < inside.y0
                    or place.y1 > inside.y1
                )
                overlap = sum(_overlap(place, o) for j, o in enumerate(taken) if j != i)
                cost = overlap + (1e9 if outside else 0.0)
                if best is None or cost < best[0]:
                    best = (cost, (dx, dy), (ha, va), place)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, (dx, dy), (ha, va), place = best
        taken.append(place)
        far = np.hypot(dx, dy) > LABEL_DISTANCES[0] + 1
        annotations.append(
            axes.annotate(
                label,
                (xs[i], ys[i]),
                textcoords="offset points",
                xytext=(dx, dy),
                ha=ha,
                va=va,
                fontsize=fontsize,
                fontweight=weight,
                arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6} if far else None,
            )
        )
    return annotations
