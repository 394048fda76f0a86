"""``metalab-tune``: the same small validation sweep of every learner's main learning rate(s).

    metalab-tune plan                 # the trials, as a table
    metalab-tune queue [NAME ...]     # dvc exp run --queue, one experiment per trial
    dvc queue start -j 2              # DVC runs them (dvc queue status, dvc queue logs)
    metalab-tune collect [--apply]    # reports/tuning.md; --apply writes the choices

Equal tuning effort: every experiment gets ``len(tuning.factors)`` trials, each its main
learning rate(s) (``tuning.rates``: paths inside ``experiments.<name>``; several rates move
together) at the current value times one factor, trained for ``tuning.budget_fraction`` of
its own iterations and validated once at the end, on the validation characters only (the
train stage's validation episodes). The trial with the best validation accuracy wins; a
tie goes to the factor nearest 1 (the current value). Only ``train@<name>`` runs in a
trial, so no test episode is ever looked at.

Each trial is a DVC experiment named ``tune-<name>-f<k>`` (factor index k) in DVC's queue,
run in its own temporary copy of the project; its parameters and metrics stay in DVC's
experiment refs (`dvc exp show`), which `collect` reads.
"""

from __future__ import annotations

import argparse
import io
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalab.io import write_text
from metalab.params import Params, load_params
from metalab.schema import ParamsError

REPORT = Path("reports/tuning.md")
#: The train-stage metric a trial is selected on.
SELECTION_METRIC = "best_validation_accuracy"


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: experiment ``experiment`` with ``values`` (params path inside
    ``experiments.<experiment>`` -> value) for ``iterations`` iterations."""

    experiment: str
    factor_index: int
    factor: float
    values: Mapping[str, float]
    iterations: int

    @property
    def name(self) -> str:
        return f"tune-{self.experiment}-f{self.factor_index}"

    def overrides(self) -> dict[str, Any]:
        """The params.yaml keys the trial changes (full dotted paths) and their values."""
        prefix = f"experiments.{self.experiment}"
        changed: dict[str, Any] = {f"{prefix}.{path}": value for path, value in self.values.items()}
        changed[f"{prefix}.train.iterations"] = self.iterations
        changed[f"{prefix}.train.validate_every"] = self.iterations  # validated once, at the end
        return changed


def current_rate(params: Params, experiment: str, path: str) -> float:
    """The value of a rate path (``options.inner_lr``, ``train.meta_lr``) in effect for
    `experiment` (a ``train`` key falls back to the ``train`` section); ParamsError if it
    does not name a positive number."""
    section, key = path.split(".", 1)
    source: Any = (
        params.train_config(experiment)
        if section == "train"
        else params.experiment(experiment).options
    )
    value = getattr(source, key, None)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ParamsError(
            f"params.yaml: tuning.rates.{experiment}: {path} is {value!r} in that experiment; "
            "a rate path must name a positive number"
        )
    return float(value)


def plan(params: Params, experiments: Iterable[str] | None = None) -> list[Trial]:
    """The trials of `experiments` (default: all; every one must have ``tuning.rates``)."""
    config = params.tuning
    names = list(params.experiments) if experiments is None else list(experiments)
    unknown = [name for name in names if name not in params.experiments]
    if unknown:
        raise ParamsError(
            f"no experiment named {', '.join(unknown)}; known: {', '.join(params.experiments)}"
        )
    missing = [name for name in names if name not in config.rates]
    if missing:
        raise ParamsError(
            f"params.yaml: tuning.rates: no entry for {', '.join(missing)}; every experiment "
            "names its main learning rate(s), so that all get the same sweep"
        )
    trials = []
    for name in names:
        rates = {path: current_rate(params, name, path) for path in config.rates[name]}
        budget = params.train_config(name).iterations
        iterations = max(1, math.ceil(config.budget_fraction * budget))
        for index, factor in enumerate(config.factors):
            values = {path: rate * factor for path, rate in rates.items()}
            trials.append(Trial(name, index, factor, values, iterations))
    return trials


def queue_command(trial: Trial) -> list[str]:
    """The ``dvc exp run --queue`` command of a trial: its overrides, only its train stage."""
    command = ["dvc", "exp", "run", "--queue", "--name", trial.name]
    for key, value in trial.overrides().items():
        command += ["--set-param", f"{key}={value!r}"]
    return [*command, f"train@{trial.experiment}"]


def metric_of(row: Mapping[str, Any], experiment: str) -> float | None:
    """The selection metric of `experiment`'s train stage in a `dvc.api.exp_show` row
    (columns are ``<file>:<metric>`` when several metrics files share a metric name)."""
    for key in (f"metrics/train/{experiment}.json:{SELECTION_METRIC}", SELECTION_METRIC):
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def ran_with(row: Mapping[str, Any], trial: Trial) -> bool:
    """Whether an exp_show row ran with the trial's overrides (a row left from a sweep of
    other factors or budgets under the same name does not count)."""
    for key, value in trial.overrides().items():
        recorded = row.get(key)
        if not isinstance(recorded, int | float) or not math.isclose(recorded, value, rel_tol=1e-9):
            return False
    return True


def trial_results(trials: Sequence[Trial], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Validation accuracy of each finished trial, by trial name, from `dvc.api.exp_show`
    rows (a trial run more than once: its latest row, exp_show's first)."""
    wanted = {trial.name: trial for trial in trials}
    results: dict[str, float] = {}
    for row in rows:
        trial = wanted.get(str(row.get("Experiment") or ""))
        if trial is None or trial.name in results or not ran_with(row, trial):
            continue
        accuracy = metric_of(row, trial.experiment)
        if accuracy is not None and accuracy >= 0:  # -1: never validated
            results[trial.name] = accuracy
    return results


def select(trials: Sequence[Trial], results: Mapping[str, float]) -> dict[str, Trial]:
    """Per experiment whose trials all finished, the trial with the best validation
    accuracy (a tie: the factor nearest 1, on a log scale)."""
    chosen: dict[str, Trial] = {}
    by_experiment: dict[str, list[Trial]] = {}
    for trial in trials:
        by_experiment.setdefault(trial.experiment, []).append(trial)
    for experiment, runs in by_experiment.items():
        if all(run.name in results for run in runs):
            chosen[experiment] = max(
                runs, key=lambda run: (results[run.name], -abs(math.log(run.factor)))
            )
    return chosen


def render(trials: Sequence[Trial], results: Mapping[str, float], params: Params) -> str:
    """reports/tuning.md: the sweep's settings and, per experiment, every trial's value(s)
    and validation accuracy with the chosen one in bold."""
    config = params.tuning
    chosen = select(trials, results)
    factors = ", ".join(f"{factor:g}" for factor in config.factors)
    lines = [
        "# Learning-rate sweep",
        "",
        f"Every experiment: its main learning rate(s) x {factors}, "
        f"{config.budget_fraction:g} of its iterations per trial, validated once at the end "
        f"on the validation characters ({SELECTION_METRIC}); best trial chosen "
        "(a tie: the factor nearest 1). Written by `metalab-tune collect`.",
        "",
        "| experiment | rate(s) | iterations | "
        + " | ".join(f"x{f:g}" for f in config.factors)
        + " | chosen |",
        "| :--- | :--- | ---: | " + " | ".join("---:" for _ in config.factors) + " | :--- |",
    ]
    by_experiment: dict[str, list[Trial]] = {}
    for trial in trials:
        by_experiment.setdefault(trial.experiment, []).append(trial)
    for experiment, runs in by_experiment.items():
        cells = []
        for run in runs:
            values = ", ".join(f"{value:.4g}" for value in run.values.values())
            accuracy = results.get(run.name)
            cell = f"{values}: " + ("pending" if accuracy is None else f"{accuracy:.4f}")
            cells.append(f"**{cell}**" if chosen.get(experiment) == run else cell)
        winner = chosen.get(experiment)
        verdict = (
            "pending" if winner is None else ", ".join(f"{v:.4g}" for v in winner.values.values())
        )
        rates = ", ".join(runs[0].values)
        row = f"| {experiment} | {rates} | {runs[0].iterations} | " + " | ".join(cells)
        lines.append(f"{row} | {verdict} |")
    return "\n".join(lines) + "\n"


def apply_choices(params_file: Path, chosen: Mapping[str, Trial]) -> list[str]:
    """Write each chosen trial's rate values into `params_file` (comments and layout kept);
    returns the changed keys."""
    from ruamel.yaml import YAML  # DVC's own YAML library: round-trips comments

    yaml = YAML()
    yaml.preserve_quotes = True
    document = yaml.load(params_file.read_text())
    changed = []
    for experiment, trial in chosen.items():
        for path, value in trial.values.items():
            node = document["experiments"][experiment]
            *parents, key = path.split(".")
            for parent in parents:
                if node.get(parent) is None:
                    node[parent] = {}
                node = node[parent]
            node[key] = float(f"{value:.6g}")
            changed.append(f"experiments.{experiment}.{path}={node[key]}")
    text = io.StringIO()
    yaml.dump(document, text)
    write_text(params_file, text.getvalue())
    return changed


# ------------------------------------------------------------------------------ command
def exp_show_rows() -> list[dict[str, Any]]:
    import dvc.api

    return dvc.api.exp_show()


def main(
    argv: Sequence[str] | None = None,
    run: Callable[[list[str]], int] = lambda command: subprocess.call(command),
    rows: Callable[[], list[dict[str, Any]]] = exp_show_rows,
) -> int:
    parser = argparse.ArgumentParser(prog="metalab-tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("plan", "print the trials"),
        ("queue", "queue the trials with dvc exp run --queue"),
        ("collect", "write reports/tuning.md from the finished trials"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("experiments", nargs="*", help="default: every experiment")
        if name == "collect":
            command.add_argument(
                "--apply", action="store_true", help="write the chosen rates to params.yaml"
            )
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        trials = plan(params, args.experiments or None)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "plan":
        for trial in trials:
            values = ", ".join(f"{path}={value:.4g}" for path, value in trial.values.items())
            print(f"{trial.name:40} {values} ({trial.iterations} iterations)")
        print(f"{len(trials)} trials")
        return 0
    if args.command == "queue":
        for trial in trials:
            status = run(queue_command(trial))
            if status != 0:
                print(f"error: queueing {trial.name} failed (exit {status})", file=sys.stderr)
                return 1
        print(f"queued {len(trials)} trials; run them with: dvc queue start -j 2")
        return 0
    results = trial_results(trials, rows())
    write_text(REPORT, render(trials, results, params))
    chosen = select(trials, results)
    pending = sorted({t.experiment for t in trials} - set(chosen))
    print(f"wrote {REPORT}: {len(chosen)} experiments chosen, {len(pending)} pending")
    if args.apply and chosen:
        for key in apply_choices(args.params, chosen):
            print(f"set {key}")
    return 0


def entry_point() -> None:
    sys.exit(main())
