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
run in its own temporary copy of the project with ``--single-item`` (its upstream stages'
outputs come from the DVC cache: rerunning ``download`` in the copy would fail, since
``data.sources`` is a path relative to the project). Its parameters and metrics stay in
DVC's experiment refs (`dvc exp show`), which `collect` reads and copies into
``reports/tuning_trials.json``, so a sweep can span several clones or sessions: commit that
file, and ``queue`` skips the trials it already holds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalab.io import write_json, write_text
from metalab.params import Params, load_params
from metalab.schema import ParamsError

REPORT = Path("reports/tuning.md")
#: Every finished trial's settings and validation accuracy, committed with the report: DVC
#: keeps a trial only in the refs of the clone that ran it; `queue` skips what is here.
RECORD = Path("reports/tuning_trials.json")
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
    followers = {
        name: leader for name, leader in config.follows.items() if name in params.experiments
    }
    if experiments is None:
        names = [name for name in params.experiments if name not in followers]
    else:
        names = list(experiments)
    unknown = [name for name in names if name not in params.experiments]
    if unknown:
        raise ParamsError(
            f"no experiment named {', '.join(unknown)}; known: {', '.join(params.experiments)}"
        )
    swept_followers = [name for name in names if name in followers]
    if swept_followers:
        name = swept_followers[0]
        raise ParamsError(
            f"params.yaml: tuning.follows: {name} takes {followers[name]}'s choice; sweep "
            f"{followers[name]} instead"
        )
    for name, leader in followers.items():
        if leader not in params.experiments or leader in followers:
            raise ParamsError(
                f"params.yaml: tuning.follows.{name}: {leader!r} is not an experiment with a "
                "sweep of its own"
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
    return [*command, "--single-item", f"train@{trial.experiment}"]


def metric_of(row: Mapping[str, Any], experiment: str) -> float | None:
    """The selection metric of `experiment`'s train stage in a `dvc.api.exp_show` row
    (columns are ``<file>:<metric>`` when several metrics files share a metric name)."""
    for key in (f"metrics/train/{experiment}.json:{SELECTION_METRIC}", SELECTION_METRIC):
        value = validated_accuracy(row.get(key))
        if value is not None:
            return value
    return None


def validated_accuracy(value: Any) -> float | None:
    """`value` as an accuracy if it is one (a number >= 0; -1 means never validated)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
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
        if accuracy is not None:
            results[trial.name] = accuracy
    return results


def same_settings(overrides: Mapping[str, Any], trial: Trial) -> bool:
    """Whether recorded `overrides` are `trial`'s own (same keys, values equal up to float
    rounding): a trial is identified by its settings, not its name."""
    return set(overrides) == set(trial.overrides()) and ran_with(overrides, trial)


def recorded_results(
    trials: Sequence[Trial], record: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Validation accuracy of each trial in `record` (entries of `RECORD`) whose settings
    are the trial's own, whatever name the entry was recorded under (an entry of another
    factor or budget does not count)."""
    results: dict[str, float] = {}
    for trial in trials:
        for entry in record:
            accuracy = validated_accuracy(entry.get("accuracy"))
            if accuracy is not None and same_settings(entry.get("overrides", {}), trial):
                results[trial.name] = accuracy
                break
    return results


def load_record(path: Path) -> list[dict[str, Any]]:
    """The entries of a trial record (``[]`` if there is none); ParamsError naming the file
    if it is not a JSON list of objects."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ParamsError(
            f"{path}: not JSON ({error}); delete it to start the record afresh"
        ) from None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ParamsError(f"{path}: expected a JSON list of trial entries")
    return entries


def updated_record(
    record: Sequence[Mapping[str, Any]], trials: Sequence[Trial], results: Mapping[str, float]
) -> list[dict[str, Any]]:
    """`record` with an entry for every trial in `results` (replacing an older entry with
    the same settings), sorted by trial name and settings."""
    entries = [dict(entry) for entry in record]
    for trial in trials:
        if trial.name not in results:
            continue
        entry = {
            "trial": trial.name,
            "overrides": trial.overrides(),
            "accuracy": results[trial.name],
        }
        entries = [e for e in entries if not same_settings(e.get("overrides", {}), trial)]
        entries.append(entry)
    return sorted(
        entries, key=lambda e: (str(e.get("trial")), json.dumps(e.get("overrides"), sort_keys=True))
    )


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


def at_grid_edge(winner: Trial, factors: Sequence[float]) -> str | None:
    """`"lowest"` or `"highest"` when `winner` took the smallest or largest factor of the grid
    (the best rate may then lie outside it), else None."""
    if len(factors) > 1 and winner.factor in (min(factors), max(factors)):
        return "lowest" if winner.factor == min(factors) else "highest"
    return None


def render(trials: Sequence[Trial], results: Mapping[str, float], params: Params) -> str:
    """reports/tuning.md: the sweep's settings and, per experiment, every trial's value(s)
    and validation accuracy with the chosen one in bold; a choice at the grid's edge is
    marked and listed below the table (the next round, centred on it, needs one new
    trial)."""
    config = params.tuning
    chosen = select(trials, results)
    edges: dict[str, str] = {}
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
        edge = None if winner is None else at_grid_edge(winner, config.factors)
        if edge is not None:
            edges[experiment] = edge
            verdict += f" ({edge} tried)"
        rates = ", ".join(runs[0].values)
        row = f"| {experiment} | {rates} | {runs[0].iterations} | " + " | ".join(cells)
        lines.append(f"{row} | {verdict} |")
    for name, leader in config.follows.items():
        if name in params.experiments and leader in by_experiment:
            blanks = " | ".join("" for _ in config.factors)
            verdict = "pending" if leader not in chosen else f"{leader}'s"
            lines.append(f"| {name} | follows {leader} | | {blanks} | {verdict} |")
    if edges:
        listed = ", ".join(f"{name} ({edge})" for name, edge in edges.items())
        lines += [
            "",
            f"Chosen at the edge of the grid: {listed}. Their best rate may lie beyond the "
            "values tried: after `collect --apply` the grid is centred on the choice, and "
            "`queue` runs the one trial of the next round that is not in the record yet. "
            "Rounds continue until no choice is at an edge.",
        ]
    return "\n".join(lines) + "\n"


def yaml_float(value: float) -> str:
    """`value` to 6 significant digits, spelled so that YAML 1.1 loaders (PyYAML, which DVC
    and our params loader use) read a float: ``5e-05`` would be a string there, so the
    mantissa always carries a dot (``5.0e-05``, ``1.0``)."""
    text = f"{value:.6g}"
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + (f"e{exponent}" if exponent else "")


def _closing_brace(text: str, opening: int) -> int:
    """Offset of the ``}`` that closes the flow mapping opened at offset `opening`."""
    depth = 0
    for offset in range(opening, len(text)):
        if text[offset] in "{[":
            depth += 1
        elif text[offset] in "}]":
            depth -= 1
            if depth == 0:
                return offset
    raise ParamsError(f"params file: unclosed flow mapping at offset {opening}")


def with_followers(params: Params, chosen: Mapping[str, Trial]) -> dict[str, Trial]:
    """`chosen` plus, for every experiment of ``tuning.follows`` whose leader was chosen,
    the leader's trial as its own (the same rate values)."""
    result = dict(chosen)
    for name, leader in params.tuning.follows.items():
        if name in params.experiments and leader in chosen:
            trial = chosen[leader]
            result[name] = Trial(name, trial.factor_index, trial.factor, trial.values, 0)
    return result


def apply_choices(params_file: Path, chosen: Mapping[str, Trial]) -> list[str]:
    """Write each chosen trial's rate values into `params_file`; returns the changed keys.

    The file is edited as text, one value at a time, so that everything else (comments,
    line wrapping, anchors, the ``null`` spellings) stays byte for byte: ruamel (DVC's own
    YAML library) only says where each value is. A value the experiment sets itself has
    its characters replaced; a value it inherits (``train: {<<: *train-inherit, ...}``)
    becomes one more entry of that mapping. The parent mapping (``options`` or ``train``)
    must exist in the experiment; otherwise ParamsError and the file is left untouched.
    """
    from ruamel.yaml import YAML

    text = params_file.read_text()
    document = YAML().load(text)
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    edits: list[tuple[int, int, str]] = []  # (start offset, end offset, replacement)
    changed = []
    for experiment, trial in chosen.items():
        for path, value in trial.values.items():
            node = document["experiments"][experiment]
            *parents, key = path.split(".")
            for parent in parents:
                child = node.get(parent)
                if not hasattr(child, "lc"):
                    raise ParamsError(
                        f"{params_file}: experiments.{experiment} has no `{parent}` mapping "
                        f"to hold {path}; add `{parent}: {{}}` to it first"
                    )
                node = child
            spelled = yaml_float(value)
            if key in node._ok:  # the experiment's own value: replace its characters
                line, column = node.lc.value(key)
                start = line_starts[line] + column
                match = re.match(r"[^\s,}\]#]+", text[start:])
                assert match is not None, f"no value at {params_file}:{line + 1}"
                edits.append((start, start + match.end(), spelled))
            elif node.fa.flow_style():  # inherited, `{...}`: one more entry before `}`
                opening = line_starts[node.lc.line] + node.lc.col
                closing = _closing_brace(text, opening)
                edits.append((closing, closing, f", {key}: {spelled}"))
            else:  # inherited, block mapping: one more line before its first own key
                # (after the `<<:` line if it has none), indented like its keys
                own_lines = [node.lc.key(own)[0] for own in node._ok]
                start = line_starts[min(own_lines) if own_lines else node.lc.line + 1]
                edits.append((start, start, " " * node.lc.col + f"{key}: {spelled}\n"))
            changed.append(f"experiments.{experiment}.{path}={float(spelled)}")
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    write_text(params_file, text)
    return changed


# ------------------------------------------------------------------------------ command
def exp_show_rows(commits: int = 1) -> list[dict[str, Any]]:
    """`dvc.api.exp_show` rows of experiments queued on the last `commits` commits of HEAD."""
    import dvc.api

    return dvc.api.exp_show(num=commits)


def main(
    argv: Sequence[str] | None = None,
    run: Callable[[list[str]], int] = lambda command: subprocess.call(command),
    rows: Callable[[int], list[dict[str, Any]]] = exp_show_rows,
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
        if name == "queue":
            command.add_argument(
                "--again", action="store_true", help=f"also queue trials recorded in {RECORD}"
            )
        if name == "collect":
            command.add_argument(
                "--apply", action="store_true", help="write the chosen rates to params.yaml"
            )
            command.add_argument(
                "--commits",
                type=int,
                default=1,
                help="read trials queued on the last N commits of HEAD (default 1: HEAD's "
                "own; more if you committed while the sweep ran)",
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
    try:
        record = load_record(RECORD)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.command == "queue":
        finished = set(recorded_results(trials, record))
        if finished and not args.again:
            print(f"skipping {len(finished)} trials already in {RECORD} (--again reruns them)")
            trials = [trial for trial in trials if trial.name not in finished]
        for trial in trials:
            status = run(queue_command(trial))
            if status != 0:
                print(f"error: queueing {trial.name} failed (exit {status})", file=sys.stderr)
                return 1
        print(f"queued {len(trials)} trials; run them with: dvc queue start -j 2")
        return 0
    results = {**recorded_results(trials, record), **trial_results(trials, rows(args.commits))}
    write_json(RECORD, updated_record(record, trials, results))
    write_text(REPORT, render(trials, results, params))
    chosen = select(trials, results)
    pending = sorted({t.experiment for t in trials} - set(chosen))
    print(f"wrote {REPORT}: {len(chosen)} experiments chosen, {len(pending)} pending")
    if args.apply and chosen:
        for key in apply_choices(args.params, with_followers(params, chosen)):
            print(f"set {key}")
    return 0


def entry_point() -> None:
    sys.exit(main())
