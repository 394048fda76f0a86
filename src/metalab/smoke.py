"""``metalab-smoke``: the whole pipeline at toy budgets, minutes from a fresh clone.

Builds a scratch DVC project in ``smoke/`` (git-ignored) with this project's ``dvc.yaml``,
stages and code, and a ``params.yaml`` made from the project's by `smoke_params`: every
experiment and RL experiment kept, each trained a few iterations, evaluated on a few
episodes per setting, the body pretrained briefly on a few drawings per class. Then it
brings that project up to date with `metalab.repro` (``dvc repro``, one stage per core
side by side), so the report in ``smoke/reports/`` comes from the same stages as the real
one, while the committed results in the project are never touched. A rerun reuses what
did not change (DVC's cache in ``smoke/.dvc``).

The numbers only show that everything runs: they are far from converged.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from metalab.repro import default_jobs, failure_message, reproduce
from metalab.schema import ANCHOR_PREFIX, ParamsError, read_params_file

SMOKE_DIR = "smoke"
COPIED = ("dvc.yaml", "stages", "src/metalab")  # what the stages run and depend on

# Per-experiment training at toy size: enough iterations to validate twice and checkpoint.
SMOKE_TRAIN = {
    "iterations": 4,
    "validate_every": 2,
    "validation_episodes": 3,
    "checkpoint_every": 4,
    "log_every": 1,
    "meta_batch_size": 2,
}
SMOKE_EPISODES_PER_SETTING = 3
SMOKE_PRETRAIN = {"epochs": 1, "drawings_per_class": 2}
SMOKE_RL = {
    "iterations": 2,
    "meta_batch_size": 2,
    "eval_tasks": 4,
    "eval_trajectories_per_task": 10,
}


def smoke_params(raw: dict[str, Any], project: Path) -> dict[str, Any]:
    """`raw` (a parsed params.yaml) at smoke budgets; local data sources made absolute
    against `project`, since the smoke project lives one directory further down."""
    params = copy.deepcopy({k: v for k, v in raw.items() if not k.startswith(ANCHOR_PREFIX)})
    data = params.setdefault("data", {})
    if "sources" in data:
        data["sources"] = [
            source if "://" in source else str((project / source).resolve())
            for source in data["sources"]
        ]
    for experiment in params.get("experiments", {}).values():
        train = {k: v for k, v in (experiment.get("train") or {}).items() if v is not None}
        train.update(SMOKE_TRAIN)
        experiment["train"] = train
    params.setdefault("pretrain", {}).update(SMOKE_PRETRAIN)
    for experiment in params.get("rl_experiments", {}).values():
        experiment.update(SMOKE_RL)
        steps = experiment.get("eval_adaptation_steps")
        if steps:
            experiment["eval_adaptation_steps"] = steps[:1]
    params.setdefault("evaluate", {})["max_episodes"] = SMOKE_EPISODES_PER_SETTING
    selection = params["evaluate"].get("step_selection")
    if selection:  # the same protocol on as few validation tasks as test tasks
        params["evaluate"]["step_selection"] = {**selection, "episodes": SMOKE_EPISODES_PER_SETTING}
    # The smoke runs' MLflow records stay out of the project's store.
    params.setdefault("tracking", {})["enabled"] = False
    return params


def prepare(project: Path, work: Path) -> None:
    """Copy the pipeline's code into `work`, write its params and make it a DVC project."""
    work.mkdir(exist_ok=True)
    for relative in COPIED:
        source, target = project / relative, work / relative
        if source.is_dir():
            shutil.copytree(
                source,
                target,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    params = smoke_params(read_params_file(project / "params.yaml"), project)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (work / ".dvc").is_dir():
        dvc(work, "init", "--no-scm", "-q")


def dvc(work: Path, *args: str) -> None:
    """Run DVC (through this interpreter, so an unactivated venv works) in `work`."""
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default=".", help="the metalab project (default: here)")
    parser.add_argument(
        "-j", "--jobs", type=int, default=default_jobs(), help="stages at once (default: cores)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        sys.exit(2)
    project = Path(args.project).resolve()
    if not (project / "dvc.yaml").is_file():
        print(f"error: {project} has no dvc.yaml; run from the project root", file=sys.stderr)
        sys.exit(1)
    work = project / SMOKE_DIR
    started = time.perf_counter()
    try:
        prepare(project, work)
        outcome = reproduce(work, jobs=args.jobs)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as error:
        print(f"error: could not set up the smoke project ({error})", file=sys.stderr)
        sys.exit(1)
    if outcome.failed is not None:
        print(failure_message(work, outcome.failed), file=sys.stderr)
        sys.exit(1)
    minutes = (time.perf_counter() - started) / 60
    print(f"smoke run done in {minutes:.1f} min: {work / 'reports' / 'comparison.md'}")


if __name__ == "__main__":
    main()
