"""Build the whole comparison report: tables, markdown, plots, dvc-plots data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from metalab.io import write_text
from metalab.report.budget import budget_markdown, plot_budget
from metalab.report.collect import ReportInputs, collect_inputs
from metalab.report.plots import (
    experiment_styles,
    plot_accuracy,
    plot_pareto,
    plot_speed_memory,
    plot_training_loss,
)
from metalab.report.rl import plot_rl_adaptation, rl_markdown, rl_results
from metalab.report.seeds import SEED_PAIR_COLUMNS, has_seed_runs, seed_pair_table
from metalab.report.tables import (
    comparison_table,
    markdown,
    paired_table,
    setting_column,
    step_selection_section,
)

ACCURACY_COLUMNS = ["experiment", "setting", "label", "accuracy", "ci95", "accuracy_before"]


@dataclass
class ReportFiles:
    """Paths the report wrote (reports: markdown and CSVs; plots: PNGs)."""

    markdown: Path
    comparison_csv: Path
    pairs_csv: Path
    accuracy_csv: Path
    plots: list[Path] = field(default_factory=list)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def all(self) -> list[Path]:
        return [
            self.markdown,
            self.comparison_csv,
            self.pairs_csv,
            self.accuracy_csv,
            self.markdown.parent / "rl.csv",
            *self.plots,
        ]


def accuracy_long_table(table: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """One row per (experiment, setting) with a result, accuracies in percent: the data of
    `dvc plots` (label = 'experiment setting', for a bar per row)."""
    rows = []
    for _, row in table.iterrows():
        for setting in settings:
            accuracy = row[setting_column(setting, "accuracy")]
            if pd.isna(accuracy):
                continue
            rows.append(
                {
                    "experiment": row["experiment"],
                    "setting": setting,
                    "label": f"{row['experiment']} {setting}",
                    "accuracy": 100 * accuracy,
                    "ci95": 100 * row[setting_column(setting, "ci95")],
                    "accuracy_before": 100 * row[setting_column(setting, "accuracy_before")],
                }
            )
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def with_seed_pairs(pairs: pd.DataFrame, seed_pairs: pd.DataFrame) -> pd.DataFrame:
    """The paired table with each pair's spread between seeds (columns ``seed_<column>``
    of `SEED_PAIR_COLUMNS` past a, b, setting); a pair only in `seed_pairs` (two learners
    with seeds, not in report.pairs) gets a row of its own."""
    renamed = seed_pairs.rename(
        columns={c: f"seed_{c}" for c in SEED_PAIR_COLUMNS if c not in ("a", "b", "setting")}
    )
    keys = ["a", "b", "setting"]
    merged = pairs.merge(renamed, on=keys, how="left", sort=False)
    known = set(map(tuple, pairs[keys].to_numpy()))
    extra = renamed[[tuple(k) not in known for k in renamed[keys].to_numpy()]]
    return pd.concat([merged, extra], ignore_index=True) if not extra.empty else merged


def build_report(
    metrics_dir: str | Path,
    plots_dir: str | Path,
    reports_dir: str | Path,
    sort_by: str,
    pairs: list[list[str]],
    experiments: dict[str, str] | list[str] | None = None,
    settings: list[str] | None = None,
) -> ReportFiles:
    """Read metrics/{train,eval,train_rl,eval_rl} and plots/train, write
    reports/comparison.{md,csv}, reports/pairs.csv, reports/accuracy.csv, reports/rl.csv
    and the PNGs in `plots_dir`. An invalid metrics file is left out, with a note.

    Files named <experiment>-s<seed> are extra training seeds of that experiment: with any,
    comparison.csv gains per setting the seed columns (`metalab.report.seeds.SEED_FIELDS`),
    pairs.csv the pair's spread between seeds (`SEED_PAIR_COLUMNS`, prefixed ``seed_``) and
    comparison.md a section on both; without any, those files are as before seeds existed.

    `experiments` ({name: algorithm} or names) and `settings` from params.yaml are always
    shown, "-" where nothing was produced; others found on disk are added.
    """
    plots_dir, reports_dir = Path(plots_dir), Path(reports_dir)
    inputs: ReportInputs = collect_inputs(metrics_dir, plots_dir, experiments, settings)
    notes = list(inputs.notes)
    if sort_by not in inputs.settings:
        notes.append(f"report.sort_by = {sort_by!r} has no results; rows are not ranked")
    table = comparison_table(inputs, sort_by)
    pair_rows, pair_notes = paired_table(inputs, pairs)
    notes += pair_notes
    seed_pairs = seed_pair_table(inputs, pairs) if has_seed_runs(inputs) else None
    pairs_csv = pair_rows if seed_pairs is None else with_seed_pairs(pair_rows, seed_pairs)
    rl = rl_results(metrics_dir, notes)
    files = ReportFiles(
        markdown=reports_dir / "comparison.md",
        comparison_csv=reports_dir / "comparison.csv",
        pairs_csv=reports_dir / "pairs.csv",
        accuracy_csv=reports_dir / "accuracy.csv",
        table=table,
        notes=notes,
    )
    write_text(
        files.markdown,
        markdown(
            table,
            pair_rows,
            inputs.settings,
            sort_by,
            notes,
            seed_pairs=seed_pairs,
            budget=budget_markdown(inputs),
            steps=step_selection_section(inputs, table),
        )
        + "\n"
        + rl_markdown(rl),
    )
    write_text(reports_dir / "rl.csv", rl.to_csv(index=False))
    write_text(files.comparison_csv, table.to_csv(index=False))
    write_text(files.pairs_csv, pairs_csv.to_csv(index=False))
    write_text(files.accuracy_csv, accuracy_long_table(table, inputs.settings).to_csv(index=False))
    curves = {name: record.curve for name, record in inputs.experiments.items()}
    # one look per experiment in every figure; learner families decide the loss panels
    algorithms = {name: record.algorithm for name, record in inputs.experiments.items()}
    styles = experiment_styles(list(inputs.experiments), algorithms)
    colors = {name: color for name, (color, _) in styles.items()}
    files.plots = [
        plot_training_loss(curves, plots_dir / "training_loss.png", styles, algorithms),
        plot_budget(inputs, plots_dir / "budget.png", styles),
        plot_accuracy(table, inputs.settings, plots_dir / "accuracy.png", colors),
        plot_pareto(table, sort_by, plots_dir / "pareto.png"),
        plot_speed_memory(table, plots_dir / "speed_memory.png", colors),
        plot_rl_adaptation(rl, plots_dir / "rl_adaptation.png"),
    ]
    return files
