"""The comparison tables: one row per experiment, and paired per-episode comparisons.

An experiment's row is its own run; when any experiment has extra training seeds, every
row also gets per setting the mean over its runs and the spread between them
(`metalab.report.seeds`), and the markdown a section on that spread.

Tables hold raw numbers (accuracies as fractions, NaN where unknown); `markdown` turns
them into text with percentages, 95% intervals and "-" for what is missing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from metalab.records import SettingResult, TrainSummary
from metalab.report.collect import ReportInputs
from metalab.report.seeds import SEED_FIELDS, has_seed_runs, seed_accuracies, seed_summary
from metalab.statistics import paired_difference

TRAIN_FIELDS = [
    "total_parameters",
    "trainable_parameters",
    "parameters_per_training_task",
    "final_loss",
    "min_loss",
    "training_seconds",
    "tasks_per_s",
    "peak_memory_mb",
]
SETTING_FIELDS = ["accuracy", "ci95", "accuracy_before", "ci95_before", "gain", "gain_ci95"]
PAIR_COLUMNS = [
    "a",
    "b",
    "setting",
    "accuracy_a",
    "accuracy_b",
    "difference",
    "ci95",
    "episodes",
    "verdict",
    "note",
]
MISSING = "-"
BEST_MARK = "★"


def setting_column(setting: str, field: str) -> str:
    return f"{setting}_{field}"


def train_columns(train: TrainSummary | None) -> dict[str, float | None]:
    """The `TRAIN_FIELDS` of a train summary (all None without one)."""
    return {field: None if train is None else getattr(train, field) for field in TRAIN_FIELDS}


def setting_columns(result: SettingResult | None) -> dict[str, float | None]:
    """The `SETTING_FIELDS` of one setting's result (all None when not evaluated)."""
    return {field: None if result is None else getattr(result, field) for field in SETTING_FIELDS}


def comparison_table(inputs: ReportInputs, sort_by: str) -> pd.DataFrame:
    """One row per experiment: training cost, and per setting the accuracy after and
    before adaptation with 95% half-widths and the gain (all fractions; NaN = unknown).

    Sorted by `sort_by`'s accuracy (best first, unknown last); ``best`` marks the top row
    (all rows tied with it). Without any `sort_by` result the order is unchanged.
    """
    rows = []
    for record in inputs.experiments.values():
        row = {"experiment": record.name, "algorithm": record.algorithm}
        row.update(train_columns(record.train))
        row["evaluation_peak_memory_mb"] = (
            record.evaluation.peak_memory_mb if record.evaluation is not None else None
        )
        for setting in inputs.settings:
            for field, value in setting_columns(record.setting(setting)).items():
                row[setting_column(setting, field)] = value
            for field, value in seed_summary(seed_accuracies(record, setting)).items():
                row[setting_column(setting, field)] = value
        rows.append(row)
    columns = ["experiment", "algorithm", *TRAIN_FIELDS, "evaluation_peak_memory_mb"] + [
        setting_column(setting, field) for setting in inputs.settings for field in SETTING_FIELDS
    ]
    if has_seed_runs(inputs):  # only then: a table of single runs stays as it was
        columns += [
            setting_column(setting, field) for setting in inputs.settings for field in SEED_FIELDS
        ]
    table = pd.DataFrame(rows, columns=columns)
    numeric = columns[2:]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce").astype(float)
    key = setting_column(sort_by, "accuracy")
    table["best"] = False
    if key in table and table[key].notna().any():
        table = table.sort_values(
            [key, "experiment"], ascending=[False, True], na_position="last", kind="stable"
        ).reset_index(drop=True)
        table["best"] = table[key] == table[key].max()
    return table


def paired_table(
    inputs: ReportInputs, groups: list[list[str]], settings: list[str] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Paired comparisons on the shared episodes: for each group (2 or more experiments)
    every pair (a, b) in listed order, per setting, the mean and 95% half-width of the
    per-episode accuracy differences a - b.

    Returns (table with `PAIR_COLUMNS`, notes). A pair that cannot be compared (missing
    experiment or per-episode file, different episode sets) gets a row with NaNs and a
    note saying why.
    """
    settings = inputs.settings if settings is None else settings
    rows, notes = [], []
    for group in groups:
        if len(group) < 2:
            notes.append(f"report.pairs entry {group}: needs at least two experiments")
            continue
        for a, b in itertools.combinations(group, 2):
            for setting in settings:
                row = {column: math.nan for column in PAIR_COLUMNS}
                row.update(a=a, b=b, setting=setting, verdict=MISSING, note="")
                reason = _pair_problem(inputs, a, b, setting)
                if reason is None:
                    accuracy_a = inputs.experiments[a].episode_accuracies(setting)
                    accuracy_b = inputs.experiments[b].episode_accuracies(setting)
                    difference = paired_difference(accuracy_a.to_numpy(), accuracy_b.to_numpy())
                    row.update(
                        accuracy_a=float(accuracy_a.mean()),
                        accuracy_b=float(accuracy_b.mean()),
                        difference=difference.mean,
                        ci95=difference.ci95,
                        episodes=difference.episodes,
                        verdict=_verdict(a, b, difference.mean, difference.significant),
                    )
                else:
                    row["note"] = reason
                    notes.append(f"pair {a} vs {b}: {reason}")
                rows.append(row)
    return pd.DataFrame(rows, columns=PAIR_COLUMNS), list(dict.fromkeys(notes))


def _pair_problem(inputs: ReportInputs, a: str, b: str, setting: str) -> str | None:
    """Why a and b cannot be paired on `setting`, or None when they can."""
    for name in (a, b):
        record = inputs.experiments.get(name)
        if record is None:
            return f"no experiment named {name!r}"
        if record.episodes is None:
            return f"{name} has no per-episode results (metrics/eval/{name}.episodes.csv)"
        if record.episode_accuracies(setting) is None:
            return f"{name} has no per-episode results for {setting}"
    results = [inputs.experiments[name].setting(setting) for name in (a, b)]
    fingerprints = {result.episode_set if result is not None else None for result in results}
    if len(fingerprints) > 1:
        return f"{setting} evaluated on different episode sets (rerun both evaluations)"
    index_a = inputs.experiments[a].episode_accuracies(setting).index
    index_b = inputs.experiments[b].episode_accuracies(setting).index
    if not index_a.equals(index_b):
        return f"{setting}: different episodes ({len(index_a)} vs {len(index_b)})"
    return None


def _verdict(a: str, b: str, mean: float, significant: bool) -> str:
    if not significant:
        return "no significant difference"
    return f"{a} better" if mean > 0 else f"{b} better"


# --------------------------------------------------------------------------- formatting
def _known(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def percent(value: float | None, ci95: float | None = None, signed: bool = False) -> str:
    """0.9521, 0.0042 -> '95.21 ± 0.42' (percent); '-' when unknown."""
    if not _known(value):
        return MISSING
    text = f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return f"{text} ± {100 * ci95:.2f}" if _known(ci95) else text


def durations(seconds: Iterable[float | None]) -> list[str]:
    """A column of durations in one unit, so that they compare at a glance: seconds if the
    longest is under 2 minutes, else minutes if under 2 hours, else hours ('117.3 s' next
    to '2.8 min' becomes '2.0 min' next to '2.8 min'). Missing values become '-'."""
    values = list(seconds)
    known = [value for value in values if _known(value)]
    longest = max(known, default=0.0)
    if longest < 120:
        scale, unit, digits = 1, "s", 1
    elif longest < 7200:
        scale, unit, digits = 60, "min", 1
    else:
        scale, unit, digits = 3600, "h", 2
    return [f"{v / scale:.{digits}f} {unit}" if _known(v) else MISSING for v in values]


def number(value: float | None, digits: int = 0, thousands: bool = False) -> str:
    if not _known(value):
        return MISSING
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one 'l'/'r' per column (default: l then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if side == "r" else ":---" for side in align]
    lines = [header, rule, *rows]
    return "\n".join(
        "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines
    )


def text(value: object) -> str:
    """A string cell, '-' for None/NaN/empty."""
    return value if isinstance(value, str) and value else MISSING


def experiment_label(row: pd.Series) -> str:
    return f"{BEST_MARK} {row['experiment']}" if row["best"] else str(row["experiment"])


def _best_formatter(table: pd.DataFrame, setting: str) -> Callable[[pd.Series], str]:
    """Formats a row's accuracy for `setting`, in bold where it is the column's best."""
    column = table[setting_column(setting, "accuracy")]
    best = column.max() if column.notna().any() else np.nan

    def render(row: pd.Series) -> str:
        value = row[setting_column(setting, "accuracy")]
        text = percent(value, row[setting_column(setting, "ci95")])
        return f"**{text}**" if _known(value) and value == best else text

    return render


def seed_sections(table: pd.DataFrame, seed_pairs: pd.DataFrame, settings: list[str]) -> list[str]:
    """The markdown on the spread between training seeds (empty without seed columns)."""
    if not settings or setting_column(settings[0], "seeds") not in table:
        return []
    several = table[table[[setting_column(s, "seeds") for s in settings]].max(axis=1) > 1]

    def spread(row: pd.Series, setting: str) -> str:
        count = row[setting_column(setting, "seeds")]
        if not _known(count) or count == 0:
            return MISSING
        text = percent(row[setting_column(setting, "seed_mean")])
        if count > 1:
            text += (
                f" ± {100 * row[setting_column(setting, 'seed_std')]:.2f} "
                f"[{100 * row[setting_column(setting, 'seed_min')]:.2f}, "
                f"{100 * row[setting_column(setting, 'seed_max')]:.2f}] ({count:.0f})"
            )
        return text

    sections = [
        "## Spread between training seeds",
        "Learners trained with several seeds (params.yaml `seed_runs`; the tables above show "
        "each learner's own run). Per setting: the mean accuracy over its runs ± the "
        "standard deviation between seeds (ddof = 1) [lowest, highest seed] (runs). All runs "
        "are tested on the same tasks; the 95% intervals above cover only the choice of "
        "tasks, this spread the training run.",
        markdown_table(
            ["Experiment", *settings],
            [
                [str(row["experiment"])] + [spread(row, s) for s in settings]
                for _, row in several.iterrows()
            ],
            "l" + "r" * len(settings),
        ),
        "## Differences against the spread between seeds",
    ]
    if seed_pairs.empty:
        sections.append("No pair with seeds on either side.")
        return sections
    sections.append(
        "Pairs of `report.pairs` with extra seeds on a side, and every two learners with "
        "extra seeds. A - B: difference of the means over seeds, in percentage points. Range "
        "rule: inside the spread when |A - B| is at most the larger of the two seed ranges "
        "(max - min). Welch rule, when both have two or more seeds: the 95% Welch t interval "
        "of A - B over the per-seed means (Welch-Satterthwaite degrees of freedom); inside "
        "the spread when it contains 0. The verdict uses the Welch rule where it applies; the "
        "range rule says only whether a difference is larger than the seed ranges seen, not "
        "which learner is better (with one run on a side it is no test: the paired "
        "comparisons above judge the test tasks)."
    )
    sections.append(
        markdown_table(
            ["A", "B", "Setting", "Seeds", "A - B", "Larger seed range", "Welch 95%", "Verdict"],
            [
                [
                    row["a"],
                    row["b"],
                    row["setting"],
                    f"{row['seeds_a']:.0f} / {row['seeds_b']:.0f}",
                    percent(row["difference"], signed=True),
                    percent(max(row["range_a"], row["range_b"])),
                    (
                        f"± {100 * row['welch_ci95']:.2f} (df {row['welch_df']:.1f})"
                        if _known(row["welch_ci95"])
                        else MISSING
                    ),
                    row["verdict"],
                ]
                for _, row in seed_pairs.iterrows()
            ],
            "lllrrrrl",
        )
    )
    return sections


def step_selection_cell(result: SettingResult | None) -> str:
    """A setting's test-time steps as chosen by ``evaluate.step_selection``: '3 (trained
    setting)', or the chosen count followed by each candidate's validation accuracy in %
    ('1 (1: 92.50, 2: 85.90)'); '-' without a choice."""
    if result is None or result.step_selection is None:
        return MISSING
    if result.step_selection.trained_setting:
        return f"{result.adaptation_steps} (trained setting)"
    tried = ", ".join(
        f"{steps}: {100 * accuracy:.2f}"
        for steps, accuracy in result.step_selection.validation_accuracy.items()
    )
    return f"{result.adaptation_steps} ({tried})"


def step_selection_section(inputs: ReportInputs, table: pd.DataFrame) -> str | None:
    """The '## Test-time adaptation steps' section: per experiment with a step choice (in
    the rows' order) and setting, the steps used and the candidates' validation accuracy;
    None when no evaluation has a choice (the report is then as before the option)."""
    names = [
        name
        for name in table["experiment"]
        if name in inputs.experiments
        and any(
            (result := inputs.experiments[name].setting(setting)) is not None
            and result.step_selection is not None
            for setting in inputs.settings
        )
    ]
    if not names:
        return None
    rows = [
        [name] + [step_selection_cell(inputs.experiments[name].setting(s)) for s in inputs.settings]
        for name in names
    ]
    return "\n\n".join(
        [
            "## Test-time adaptation steps",
            "Steps used at test time by the learners that adapt by gradient steps, with "
            "`evaluate.step_selection`: on its training setting a learner keeps its trained "
            "steps; on the others it uses the candidate with the best validation accuracy "
            "(in parentheses, %), on tasks from the validation characters.",
            markdown_table(
                ["Experiment", *inputs.settings], rows, "l" + "r" * len(inputs.settings)
            ),
        ]
    )


def markdown(
    table: pd.DataFrame,
    pairs: pd.DataFrame,
    settings: list[str],
    sort_by: str,
    notes: list[str],
    seed_pairs: pd.DataFrame | None = None,
    budget: str | None = None,
    steps: str | None = None,
) -> str:
    """The full comparison report (reports/comparison.md); `budget`: the budget section
    (`metalab.report.budget.budget_markdown`), `seed_pairs`: `seed_pair_table`, `steps`:
    the test-time steps section (`step_selection_section`), after the gain table."""
    sections = [
        "# Meta-learner comparison",
        "Generated by the `report` stage from `metrics/train`, `metrics/eval` and "
        "`plots/train`. Accuracies are percentages: the mean over the fixed meta-test "
        "episodes (the same tasks for every learner) ± the 95% interval "
        "1.96 · s / √n (s: sample standard deviation, ddof = 1). "
        f"Rows are sorted by {sort_by} accuracy after adaptation; {BEST_MARK} marks the "
        "best, bold the best of each column; - means not available (see Notes).",
        "## Accuracy after adaptation",
        markdown_table(
            ["Experiment", "Algorithm", *settings],
            [
                [experiment_label(row), text(row["algorithm"])]
                + [_best_formatter(table, setting)(row) for setting in settings]
                for _, row in table.iterrows()
            ],
            "ll" + "r" * len(settings),
        ),
        "## Before adaptation and gain",
        "Before: the meta-learned starting point (0 adaptation steps), only for learners "
        "that adapt by gradient steps. Gain: mean per-episode (after - before) ± 95% interval, "
        "in percentage points.",
        markdown_table(
            ["Experiment"]
            + [f"{setting} {what}" for setting in settings for what in ("before", "gain")],
            [
                [experiment_label(row)]
                + [
                    cell
                    for setting in settings
                    for cell in (
                        percent(
                            row[setting_column(setting, "accuracy_before")],
                            row[setting_column(setting, "ci95_before")],
                        ),
                        percent(
                            row[setting_column(setting, "gain")],
                            row[setting_column(setting, "gain_ci95")],
                            signed=True,
                        ),
                    )
                ]
                for _, row in table.iterrows()
            ],
        ),
        *([steps] if steps else []),
        "## Training cost",
        markdown_table(
            [
                "Experiment",
                "Parameters",
                "Trainable",
                "Trainable / training task",
                "Final loss",
                "Min loss",
                "Training time",
                "Tasks/s",
                "Peak memory (MB)",
            ],
            [
                [
                    experiment_label(row),
                    number(row["total_parameters"], thousands=True),
                    number(row["trainable_parameters"], thousands=True),
                    number(row["parameters_per_training_task"], 2),
                    number(row["final_loss"], 4),
                    number(row["min_loss"], 4),
                    training_time,
                    number(row["tasks_per_s"], 1),
                    number(row["peak_memory_mb"], 0, thousands=True),
                ]
                for (_, row), training_time in zip(
                    table.iterrows(), durations(table["training_seconds"]), strict=True
                )
            ],
        ),
        *([budget] if budget else []),
        "## Paired comparisons",
    ]
    if pairs.empty:
        sections.append("No pairs configured (`report.pairs` in params.yaml).")
    else:
        sections.append(
            "Mean per-episode accuracy difference A - B on the shared episodes ± its 95% "
            "interval, in percentage points; a difference is significant when the interval "
            "excludes 0."
        )
        sections.append(
            markdown_table(
                ["A", "B", "Setting", "A accuracy", "B accuracy", "A - B", "Episodes", "Verdict"],
                [
                    [
                        row["a"],
                        row["b"],
                        row["setting"],
                        percent(row["accuracy_a"]),
                        percent(row["accuracy_b"]),
                        percent(row["difference"], row["ci95"], signed=True),
                        number(row["episodes"]),
                        row["verdict"],
                    ]
                    for _, row in pairs.iterrows()
                ],
                "lllrrrrl",
            )
        )
    if seed_pairs is not None:
        sections += seed_sections(table, seed_pairs, settings)
    sections.append("## Notes")
    sections.append("\n".join(f"- {note}" for note in notes) if notes else "None.")
    return "\n\n".join(sections) + "\n"
