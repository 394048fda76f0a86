"""The README's results block, rendered from reports/comparison.csv and updated in place
between the markers ``<!-- results:start -->`` and ``<!-- results:end -->``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from metalab.io import write_text
from metalab.report.tables import (
    MISSING,
    durations,
    experiment_label,
    markdown_table,
    number,
    percent,
    setting_column,
    text,
)

START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
_ACCURACY_SUFFIX = "_accuracy"


def table_settings(table: pd.DataFrame) -> list[str]:
    """The settings of a comparison table, in column order ('5w1s_accuracy' -> '5w1s')."""
    return [
        column.removesuffix(_ACCURACY_SUFFIX)
        for column in table.columns
        if column.endswith(_ACCURACY_SUFFIX) and not column.endswith("_before" + _ACCURACY_SUFFIX)
    ]


def render_readme_table(
    comparison: pd.DataFrame | str | Path, settings: list[str] | None = None
) -> str:
    """A compact markdown table of a comparison table (or reports/comparison.csv): per
    experiment its accuracy ± 95% interval in each setting, training time and trainable
    parameters, in the table's order, best marked. When some experiment has several
    training seeds, a last column gives the first setting's mean over seeds and [lowest,
    highest seed] (runs)."""
    table = comparison if isinstance(comparison, pd.DataFrame) else pd.read_csv(comparison)
    settings = table_settings(table) if settings is None else settings
    if "best" not in table:
        table = table.assign(best=False)
    rows = []
    training_times = durations(table.get("training_seconds", [None] * len(table)))
    for (_, row), training_time in zip(table.iterrows(), training_times, strict=True):
        rows.append(
            [experiment_label(row), text(row.get("algorithm"))]
            + [
                percent(row.get(setting_column(s, "accuracy")), row.get(setting_column(s, "ci95")))
                for s in settings
            ]
            + [
                training_time,
                number(row.get("trainable_parameters"), thousands=True),
            ]
        )
    header = ["Experiment", "Algorithm", *settings, "Training time", "Trainable parameters"]
    seeds = setting_column(settings[0], "seeds") if settings else None
    if seeds in table and (table[seeds] > 1).any():
        header.append(f"{settings[0]} over seeds")
        for row, (_, values) in zip(rows, table.iterrows(), strict=True):
            row.append(seed_spread(values, settings[0]))
    return markdown_table(header, rows, "ll" + "r" * (len(header) - 2))


def seed_spread(row: pd.Series, setting: str) -> str:
    """'95.10 [94.20, 96.00] (3)': mean over seeds [lowest, highest] (runs); '-' for one."""
    count = row.get(setting_column(setting, "seeds"))
    if count is None or pd.isna(count) or count < 2:
        return MISSING
    low, high = row[setting_column(setting, "seed_min")], row[setting_column(setting, "seed_max")]
    mean = percent(row[setting_column(setting, "seed_mean")])
    return f"{mean} [{100 * low:.2f}, {100 * high:.2f}] ({count:.0f})"


def update_readme(readme: str | Path, block: str) -> bool:
    """Replace the text between the results markers of `readme` with `block`.

    Returns True when the file changed. Raises ValueError when the markers are missing,
    repeated or out of order (nothing is written then).
    """
    readme = Path(readme)
    text = readme.read_text()
    pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER), re.DOTALL)
    if text.count(START_MARKER) != 1 or text.count(END_MARKER) != 1 or not pattern.search(text):
        raise ValueError(
            f"{readme}: needs exactly one '{START_MARKER}' followed by one '{END_MARKER}'"
        )
    updated = pattern.sub(lambda _: f"{START_MARKER}\n{block.strip()}\n{END_MARKER}", text, count=1)
    if updated == text:
        return False
    write_text(readme, updated)
    return True
