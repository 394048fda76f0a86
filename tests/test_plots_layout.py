"""Each curve is declared once, and drawn readably however many experiments there are.

dvc.yaml: the train stages write the curves (plots/train/<name>.csv, plots/train_rl/<name>.csv)
as plain uncached outputs, and the top-level `plots:` overlays them across experiments,
every (file, column) in one plot only (a stage plot is drawn on its own as well, so a curve
in both would be drawn twice). `dvc plots show` writes dvc_plots/, which git ignores.

The report's figures: with 23 experiments no two curves look alike, a panel holds a few
curves of distinct hues, legends and point names overlap nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import matplotlib.colors
import matplotlib.text
import numpy as np
import pandas as pd
import pytest
import yaml

from metalab.report.plots import (
    CONTEXT_GREY,
    PANEL_LINES,
    experiment_styles,
    family_panels,
    label_points,
    plt,
    training_loss_figure,
)

ROOT = Path(__file__).resolve().parents[1]
# top-level plot id -> (the foreach mapping in params.yaml, directory, column drawn)
OVERLAYS = {
    "training_loss": ("experiments", "plots/train", "loss"),
    "validation_accuracy": ("experiments", "plots/train", "validation_accuracy"),
    "rl_post_adaptation_return": ("rl_experiments", "plots/train_rl", "post_adaptation_return"),
}
# (train stage, foreach / matrix mapping, the curve it writes); train_rl is a matrix of
# the RL experiments and the training seeds
CURVE_STAGES = [
    ("train", "experiments", "plots/train/${key}.csv"),
    ("train_rl", "rl_experiments", "plots/train_rl/${item.experiment}-s${item.seed}.csv"),
]


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def top_level_plots(dvc: dict) -> dict[str, dict]:
    """{plot id: definition} of dvc.yaml's top-level `plots:` (a list of ids or
    one-entry mappings)."""
    plots = {}
    for entry in dvc.get("plots") or []:
        if isinstance(entry, str):
            plots[entry] = {}
        else:
            ((plot_id, definition),) = entry.items()
            plots[plot_id] = definition or {}
    return plots


def _expand(path: str, params: dict, stage: dict) -> list[str]:
    """A stage's path, once per foreach key when it has one."""
    if "foreach" not in stage:
        return [path]
    mapping = params[stage["foreach"].removeprefix("${").removesuffix("}")]
    return [path.replace("${key}", key) for key in mapping]


def _entries(section: list) -> list[tuple[str, dict]]:
    result = []
    for entry in section or []:
        if isinstance(entry, str):
            result.append((entry, {}))
        else:
            ((path, props),) = entry.items()
            result.append((path, props or {}))
    return result


def _columns(y) -> list[str | None]:
    if y is None:
        return [None]  # DVC picks a column itself
    return [y] if isinstance(y, str) else list(y)


def declared_curves(dvc: dict, params: dict) -> tuple[Counter, set[str]]:
    """(Counter of (file, column) over the top-level definitions, the files drawn as stage
    plots). A directory id stands for the files in it."""
    top: Counter = Counter()
    for plot_id, definition in top_level_plots(dvc).items():
        y = definition.get("y")
        if isinstance(y, dict):
            for path, columns in y.items():
                top.update((path, column) for column in _columns(columns))
            continue
        directory = ROOT / plot_id
        files = (
            [str(p.relative_to(ROOT)) for p in sorted(directory.rglob("*")) if p.is_file()]
            if directory.is_dir()
            else [plot_id]
        )
        top.update((path, column) for path in files for column in _columns(y))
    stage_plots = set()
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for path, _ in _entries(body.get("plots")):
            for expanded in _expand(path, params, stage):
                directory = ROOT / expanded
                if directory.is_dir():
                    stage_plots.update(
                        str(p.relative_to(ROOT)) for p in directory.rglob("*") if p.is_file()
                    )
                stage_plots.add(expanded)
    return top, stage_plots


def test_dvc_yaml_declares_every_curve_at_most_once():
    dvc, params = load_yaml("dvc.yaml"), load_yaml("params.yaml")
    top, stage_plots = declared_curves(dvc, params)

    twice = sorted(curve for curve, count in top.items() if count > 1)
    assert not twice, f"curves in more than one top-level plot of dvc.yaml: {twice}"
    both = sorted({path for path, _ in top} & stage_plots)
    assert not both, (
        f"dvc.yaml draws these files as stage plots and in a top-level plot: {both} "
        "(declare them under the stage's `outs:` instead)"
    )


@pytest.mark.parametrize("stage, mapping, curve", CURVE_STAGES)
def test_curves_stay_uncached_outputs_of_their_train_stage(stage, mapping, curve):
    body = load_yaml("dvc.yaml")["stages"][stage]
    if "matrix" in body:
        assert body["matrix"]["experiment"] == "${" + mapping + "}"
    else:
        assert body["foreach"] == "${" + mapping + "}"
        body = body["do"]
    outputs = dict(_entries(body.get("outs")) + _entries(body.get("plots")))
    assert curve in outputs, f"stage {stage} does not declare {curve}"
    assert outputs[curve].get("cache") is False, f"{curve} should be `cache: false`"


@pytest.mark.parametrize("plot_id", OVERLAYS)
def test_top_level_overlay_lists_every_configured_experiment(plot_id):
    mapping, directory, column = OVERLAYS[plot_id]
    plots = top_level_plots(load_yaml("dvc.yaml"))
    assert plot_id in plots, f"dvc.yaml has no top-level plot {plot_id!r}"
    definition = plots[plot_id]
    names = list(load_yaml("params.yaml")[mapping])

    assert definition["x"] == "iteration"
    runs = names
    if mapping == "rl_experiments":  # one curve per experiment and training seed
        seeds = load_yaml("dvc.yaml")["stages"]["train_rl"]["matrix"]["seed"]
        runs = [f"{name}-s{seed}" for name in names for seed in seeds]
    expected = {f"{directory}/{run}.csv": column for run in runs}
    assert definition["y"] == expected, (
        f"top-level plot {plot_id!r} must overlay exactly the `{mapping}` of params.yaml "
        f"(one line `{directory}/<name>.csv: {column}` each, <name>-s<seed> for RL)"
    )
    for path in expected:  # the committed curves have the column drawn
        if (ROOT / path).is_file():
            assert column in pd.read_csv(ROOT / path, nrows=1).columns, path


def test_dvc_plots_output_is_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository")
    for path in ("dvc_plots/index.html", "stages/dvc_plots/index.html"):
        result = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, check=False
        )
        assert result.returncode == 0, f"{path} is not git-ignored"


# ------------------------------------------------------------------ report figures
# 23 experiments as in params.yaml: (name, algorithm)
EXPERIMENTS = (
    [(n, "maml") for n in ("maml", "maml_bf16", "fomaml", "metasgd", "mamlpp", "maml_drop")]
    + [(n, "taml") for n in ("taml_entropy", "taml_theil")]
    + [("taml_encoder", "anil_task_encoder")]
    + [(f"anil_s{i}", "maml") for i in range(1, 6)]
    + [("reptile", "reptile"), ("cavia", "cavia")]
    + [("protonets", "protonets"), ("protonets_drop", "protonets")]
    + [("metanets", "generated_head"), ("metanets_emb", "film_prototypes")]
    + [("metanets_drop", "generated_head"), ("metanets_emb_drop", "film_prototypes")]
    + [("leo", "leo")]
)


def synthetic_curves(names: list[str]) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    curves = {}
    for i, name in enumerate(names):
        iterations = np.arange(60 + 20 * (i % 5))
        loss = (0.3 + i / 40) + 1.5 / np.sqrt(iterations + 1) + 0.05 * rng.random(iterations.size)
        curves[name] = pd.DataFrame({"iteration": iterations, "loss": loss})
    return curves


def curves_drawn(figure: plt.Figure) -> list[tuple[plt.Axes, str, tuple, str]]:
    """(axes, label, RGB, line style) of every labelled line (not the grey context)."""
    lines = []
    for axes in figure.axes:
        for line in axes.get_lines():
            if not line.get_label().startswith("_"):
                rgb = matplotlib.colors.to_rgb(line.get_color())
                lines.append((axes, line.get_label(), rgb, line.get_linestyle()))
    return lines


def test_loss_figure_with_23_experiments_has_no_two_curves_alike():
    names = [name for name, _ in EXPERIMENTS]
    algorithms = dict(EXPERIMENTS)
    figure = training_loss_figure(synthetic_curves(names), algorithms=algorithms)
    try:
        lines = curves_drawn(figure)
        assert sorted(label for _, label, _, _ in lines) == sorted(names)  # each once
        looks = Counter((rgb, style) for _, _, rgb, style in lines)
        repeated = [look for look, count in looks.items() if count > 1]
        assert not repeated, f"{len(repeated)} (colour, line style) pairs used twice"
        grey = matplotlib.colors.to_rgb(CONTEXT_GREY)
        for axes in figure.axes:
            own = [rgb for a, _, rgb, _ in lines if a is axes]
            assert 1 <= len(own) <= PANEL_LINES
            # within a panel, colours far apart (not shades of one hue), and none grey
            for i, a in enumerate(own):
                assert np.linalg.norm(np.subtract(a, grey)) > 0.2
                for b in own[:i]:
                    assert np.linalg.norm(np.subtract(a, b)) > 0.2, (a, b)
            legend = axes.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == [
                label for a, label, _, _ in lines if a is axes
            ]
        # legends beside the panels: none covers a panel or another legend
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        panels = [axes.get_window_extent(renderer) for axes in figure.axes]
        legends = [axes.get_legend().get_window_extent(renderer) for axes in figure.axes]
        for i, legend in enumerate(legends):
            assert not any(legend.overlaps(panel) for panel in panels)
            assert not any(legend.overlaps(other) for other in legends[:i])
    finally:
        plt.close(figure)


def test_experiments_grouped_by_family_into_small_panels():
    names = [name for name, _ in EXPERIMENTS]
    panels = family_panels(names, dict(EXPERIMENTS))

    assert sorted(n for _, members in panels for n in members) == sorted(names)
    assert all(1 <= len(members) <= PANEL_LINES for _, members in panels)
    by_panel = {n: title for title, members in panels for n in members}
    assert by_panel["protonets"] == by_panel["metanets_emb_drop"]  # one family
    # ANIL with a task encoder, a family of its own, shares TAML's small panel
    assert by_panel["taml_encoder"] == by_panel["taml_theil"]
    assert by_panel["taml_encoder"].startswith("TAML · ANIL with a task encoder")
    assert by_panel["maml"] != by_panel["protonets"]
    # MAML's 11 in two parts, in params order: the MAML variants, then ANIL
    assert [members for title, members in panels if "part" in title] == [
        names[:6],
        [f"anil_s{i}" for i in range(1, 6)],
    ]


def test_metrics_recorded_under_the_seed_names_give_the_same_panels_and_styles():
    """Committed metrics name the algorithms as they were when trained (``metanets``,
    ``metanets_embedding``; the task encoder as ``taml``): the figures drawn from them keep
    their layout, and the renamed algorithms land in the same panels."""
    recorded = {"generated_head": "metanets", "film_prototypes": "metanets_embedding"}
    old = {name: recorded.get(algorithm, algorithm) for name, algorithm in EXPERIMENTS}
    old["taml_encoder"] = "taml"
    names = [name for name, _ in EXPERIMENTS]
    new_panels = [members for _, members in family_panels(names, dict(EXPERIMENTS))]
    old_panels = [members for _, members in family_panels(names, old)]
    assert new_panels == old_panels
    assert experiment_styles(names, dict(EXPERIMENTS)) == experiment_styles(names, old)


@pytest.mark.parametrize("count", [1, 23, 60, 108])
def test_styles_distinct_for_many_experiments(count):
    names = [f"e{i}" for i in range(count)]
    styles = experiment_styles(names)
    assert len(set(styles.values())) == count


def test_point_names_overlap_neither_each_other_nor_points():
    rng = np.random.default_rng(1)
    xs = np.concatenate([rng.normal(170, 15, 18), [120, 140, 230, 280, 480]])
    ys = np.concatenate([rng.normal(85, 4, 18), [89, 93, 91, 84, 93]])
    names = [f"experiment_{i:02d}" + "_long" * (i % 3) for i in range(xs.size)]
    figure, axes = plt.subplots(figsize=(10, 6.5))
    try:
        axes.scatter(xs, ys)
        axes.legend(["points"], loc="lower right")
        annotations = label_points(axes, xs, ys, names)
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        boxes = [matplotlib.text.Text.get_window_extent(a, renderer) for a in annotations]
        inside = axes.get_window_extent(renderer)
        legend = axes.get_legend().get_window_extent(renderer)
        points = axes.transData.transform(np.column_stack([xs, ys]))
        for i, box in enumerate(boxes):
            assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            assert not box.overlaps(legend), names[i]
            assert not any(box.overlaps(other) for other in boxes[:i]), names[i]
            assert not any(box.contains(x, y) for x, y in points), names[i]
    finally:
        plt.close(figure)
