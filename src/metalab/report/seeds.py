"""The spread between training seeds: per learner and setting the mean over its runs (its
own run and its extra seeds, params.yaml `seed_runs`), their standard deviation and range,
and for pairs of learners whether a difference is inside that spread.

Two rules, both reported (`seed_pair_table`):

- range rule: the difference of the two means over seeds is inside the spread when it is
  no larger than the larger of the two learners' seed ranges (max - min over seeds);
- Welch rule (both learners with at least two seeds): the 95% Welch t interval of the
  difference of the means over seeds, with Welch-Satterthwaite degrees of freedom, treating
  each seed's mean accuracy as one observation; inside the spread when it contains 0.

The Welch rule decides the verdict where it applies, else the range rule, which calls a
difference only "outside the seed range", never "better": with one run on a side it is no
test (the paired per-episode comparison judges the test tasks). With three seeds
the interval is wide (t quantiles of 2 to 4 degrees of freedom): a difference outside it is
a difference between training runs, not only between test tasks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metalab.report.collect import ExperimentRecord, ReportInputs

SEED_FIELDS = ["seeds", "seed_mean", "seed_std", "seed_min", "seed_max"]
SEED_PAIR_COLUMNS = [
    "a",
    "b",
    "setting",
    "seeds_a",
    "seeds_b",
    "mean_a",
    "mean_b",
    "difference",
    "range_a",
    "range_b",
    "inside_seed_range",
    "welch_ci95",
    "welch_df",
    "verdict",
]
INSIDE = "inside the spread between seeds"


def seed_accuracies(record: ExperimentRecord, setting: str) -> np.ndarray:
    """Accuracy after adaptation [runs] of every run of `record` (own run first, then its
    extra seeds) that has a `setting` result."""
    values = []
    for run in record.runs:
        result = run.setting(setting)
        if result is not None and result.accuracy is not None:
            values.append(result.accuracy)
    return np.asarray(values, dtype=float)


def seed_summary(values: np.ndarray) -> dict[str, float]:
    """The `SEED_FIELDS` of per-seed accuracies [n]: count, mean, standard deviation
    (ddof=1; NaN below two seeds), min and max (NaN without any)."""
    if values.size == 0:
        return {"seeds": 0.0, **{field: math.nan for field in SEED_FIELDS[1:]}}
    return {
        "seeds": float(values.size),
        "seed_mean": float(values.mean()),
        "seed_std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
        "seed_min": float(values.min()),
        "seed_max": float(values.max()),
    }


def has_seed_runs(inputs: ReportInputs) -> bool:
    """Whether any learner has a run besides its own (only then the report shows seeds)."""
    return any(record.seed_runs for record in inputs.experiments.values())


@dataclass(frozen=True)
class WelchInterval:
    difference: float  # mean(a) - mean(b)
    ci95: float  # half-width of the 95% interval
    df: float  # Welch-Satterthwaite degrees of freedom

    @property
    def contains_zero(self) -> bool:
        return abs(self.difference) <= self.ci95


def welch_interval(a: np.ndarray, b: np.ndarray) -> WelchInterval:
    """95% Welch t interval of mean(a) - mean(b) for samples a [n_a], b [n_b] (each at
    least two values). Equal samples without variance give a zero-width interval."""
    if a.size < 2 or b.size < 2:
        raise ValueError(f"Welch interval needs two values per side, got {a.size} and {b.size}")
    from scipy.stats import t  # scipy comes with mlflow; only this rule needs it

    var_a, var_b = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    difference = float(a.mean() - b.mean())
    standard_error = math.sqrt(var_a + var_b)
    if standard_error == 0:
        return WelchInterval(difference, 0.0, float(a.size + b.size - 2))
    df = (var_a + var_b) ** 2 / (var_a**2 / (a.size - 1) + var_b**2 / (b.size - 1))
    return WelchInterval(difference, float(t.ppf(0.975, df) * standard_error), float(df))


def compared_pairs(inputs: ReportInputs, pairs: list[list[str]]) -> list[tuple[str, str]]:
    """The pairs whose seed spread is reported: every pair of `pairs` (report.pairs, groups
    expanded in order) where a side has extra seeds, then every pair of learners that both
    have extra seeds (in report order), each pair once."""
    with_seeds = [name for name, record in inputs.experiments.items() if record.seed_runs]
    chosen: list[tuple[str, str]] = []
    for group in pairs:
        for a, b in itertools.combinations(group, 2):
            if a in with_seeds or b in with_seeds:
                chosen.append((a, b))
    chosen += list(itertools.combinations(with_seeds, 2))
    seen: set[frozenset[str]] = set()
    unique = []
    for a, b in chosen:
        if frozenset((a, b)) not in seen and a in inputs.experiments and b in inputs.experiments:
            seen.add(frozenset((a, b)))
            unique.append((a, b))
    return unique


def seed_pair_table(inputs: ReportInputs, pairs: list[list[str]]) -> pd.DataFrame:
    """Per compared pair (`compared_pairs`) and setting with results on both sides: the
    means over seeds, their difference a - b, each side's seed range, the range rule and,
    with two or more seeds per side, the Welch interval (columns `SEED_PAIR_COLUMNS`;
    fractions)."""
    rows = []
    for a, b in compared_pairs(inputs, pairs):
        for setting in inputs.settings:
            values_a = seed_accuracies(inputs.experiments[a], setting)
            values_b = seed_accuracies(inputs.experiments[b], setting)
            if values_a.size == 0 or values_b.size == 0:
                continue
            difference = float(values_a.mean() - values_b.mean())
            range_a = float(np.ptp(values_a))
            range_b = float(np.ptp(values_b))
            inside_range = abs(difference) <= max(range_a, range_b)
            row = {
                "a": a,
                "b": b,
                "setting": setting,
                "seeds_a": values_a.size,
                "seeds_b": values_b.size,
                "mean_a": float(values_a.mean()),
                "mean_b": float(values_b.mean()),
                "difference": difference,
                "range_a": range_a,
                "range_b": range_b,
                "inside_seed_range": inside_range,
                "welch_ci95": math.nan,
                "welch_df": math.nan,
            }
            if values_a.size >= 2 and values_b.size >= 2:
                welch = welch_interval(values_a, values_b)
                row.update(welch_ci95=welch.ci95, welch_df=welch.df)
                inside = welch.contains_zero
                rule = "Welch"
            else:
                inside, rule = inside_range, "range"
            higher = a if difference > 0 else b
            if inside:
                row["verdict"] = f"{INSIDE} ({rule})"
            elif rule == "Welch":
                row["verdict"] = f"{higher} better (Welch)"
            else:
                # One run on a side has no spread of its own: a few seeds' range says only
                # that the difference is larger than the runs seen, not that it is real.
                row["verdict"] = f"{higher} higher, outside the seed range (range)"
            rows.append(row)
    return pd.DataFrame(rows, columns=SEED_PAIR_COLUMNS)
