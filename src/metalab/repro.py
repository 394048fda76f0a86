"""``metalab-repro``: `dvc repro` with independent stages side by side, one per core.

DVC runs a pipeline's stages one after another. Most of metalab's stages are
independent (one train and one evaluate stage per experiment) and run at one thread
each (``train.threads: 1``), so on a machine with N cores N of them can run at once.
DVC allows that: while a stage's command runs it holds locks on that stage's deps and
outs, not on the repository, so several ``dvc repro --single-item <stage>`` processes
can work in one project. This module schedules them from DVC's own stage graph:

1. Read the graph and ask DVC which stages are out of date (`Repo.status`), once.
2. Start a stage when every stage it depends on has finished; run it (through
   ``dvc --wait-for-lock repro --single-item``) if DVC found it out of date or if a
   stage upstream of it ran, since that may have changed its inputs (DVC then decides:
   a stage whose inputs came out the same is a quick no-op); otherwise skip it.
3. Among the stages that may start, the one with the most stages downstream first
   (the pretrained body before the train stages, the train stages before the report).

Every decision about what is out of date stays DVC's; ``dvc.lock`` ends exactly as after
``dvc repro``. Each stage's output goes to ``.dvc/tmp/metalab-repro/<stage>.log``; on a
failure no new stage starts, the running ones finish, and the command exits 1 naming the
stage and the tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

LOG_DIR = Path(".dvc") / "tmp" / "metalab-repro"


@dataclass(frozen=True)
class Pipeline:
    """The stages to consider, by DVC address (``train@maml``), in dependency order.

    `upstream` maps each stage to the stages whose outputs it reads; `changed` holds the
    stages DVC reported out of date; `commands` are the stages that have a command (a
    ``.dvc`` file's stage has none and is never run).
    """

    upstream: dict[str, set[str]]
    changed: set[str] = field(default_factory=set)
    commands: set[str] = field(default_factory=set)


@dataclass
class Outcome:
    """What happened to each stage: ran (seconds), skipped, or failed (its log)."""

    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: str | None = None

    @property
    def ran(self) -> list[str]:
        return list(self.seconds)


def downstream_counts(upstream: Mapping[str, set[str]]) -> dict[str, int]:
    """How many stages depend, directly or not, on each stage."""
    below: dict[str, set[str]] = {stage: set() for stage in upstream}
    for stage in reversed(topological_order(upstream)):  # downstream first
        for parent in upstream[stage]:
            below[parent] |= {stage} | below[stage]
    return {stage: len(below[stage]) for stage in upstream}


def topological_order(upstream: Mapping[str, set[str]]) -> list[str]:
    """The stages, each after every stage it depends on; a cycle is a `ValueError`."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(stage: str) -> None:
        if state.get(stage) == "done":
            return
        if state.get(stage) == "visiting":
            raise ValueError(f"the stage graph has a cycle through {stage}")
        state[stage] = "visiting"
        for parent in sorted(upstream[stage]):
            visit(parent)
        state[stage] = "done"
        order.append(stage)

    for stage in sorted(upstream):
        visit(stage)
    return order


def schedule(
    pipeline: Pipeline,
    run_stage: Callable[[str], bool],
    jobs: int,
    on_event: Callable[[str, str, Outcome], None] = lambda stage, event, outcome: None,
) -> Outcome:
    """Run the pipeline's stages with at most `jobs` at once; `run_stage(name)` runs one
    and returns whether it succeeded. `on_event(stage, "start" | "done" | "skip" |
    "fail", outcome)` reports progress. Returns what ran, what was skipped and the first
    failure (after which no stage starts; the running ones finish)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    upstream = pipeline.upstream
    topological_order(upstream)  # refuse a cycle before running anything
    priority = downstream_counts(upstream)
    waiting = set(upstream)
    finished: set[str] = set()
    outcome = Outcome()
    running: dict[Future, tuple[str, float]] = {}

    def ready() -> list[str]:
        stages = (s for s in waiting if upstream[s] <= finished)
        return sorted(stages, key=lambda s: (-priority[s], s))

    def must_run(stage: str) -> bool:
        ran_above = any(parent in outcome.seconds for parent in upstream[stage])
        return stage in pipeline.commands and (stage in pipeline.changed or ran_above)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            skipping = True
            while skipping:  # a skipped stage may make its downstream ready
                skipping = False
                for stage in ready():
                    if not must_run(stage):
                        waiting.discard(stage)
                        finished.add(stage)
                        outcome.skipped.append(stage)
                        on_event(stage, "skip", outcome)
                        skipping = True
            if outcome.failed is None:
                for stage in ready()[: jobs - len(running)]:
                    waiting.discard(stage)
                    running[pool.submit(run_stage, stage)] = (stage, time.perf_counter())
                    on_event(stage, "start", outcome)
            if not running:
                return outcome
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage, started = running.pop(future)
                if future.result():
                    outcome.seconds[stage] = time.perf_counter() - started
                    finished.add(stage)
                    on_event(stage, "done", outcome)
                elif outcome.failed is None:
                    outcome.failed = stage
                    on_event(stage, "fail", outcome)


def read_pipeline(root: Path, targets: Iterable[str] = ()) -> Pipeline:
    """The project's stages (those of `targets` and everything upstream of them, or all)
    with DVC's view of which are out of date."""
    from dvc.repo import Repo  # DVC is heavy; only this command needs it

    # Stage addresses are relative to the working directory: read them from the root.
    with contextlib.chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph  # edges go from a stage to the stages it reads from
        upstream = {
            stage.addressing: {parent.addressing for parent in graph.successors(stage)}
            for stage in graph.nodes
        }
        commands = {stage.addressing for stage in graph.nodes if stage.cmd}
        changed = set(repo.status())
    targets = list(targets)
    if targets:
        selected: set[str] = set()
        for target in targets:
            matches = [s for s in upstream if s == target or s.startswith(f"{target}@")]
            if not matches:
                raise KeyError(
                    f"no stage {target!r} in dvc.yaml; stages: {', '.join(sorted(upstream))}"
                )
            for stage in matches:
                selected |= {stage} | _ancestors(upstream, stage)
        upstream = {s: upstream[s] & selected for s in selected}
    return Pipeline(upstream=upstream, changed=changed & set(upstream), commands=commands)


def _ancestors(upstream: Mapping[str, set[str]], stage: str) -> set[str]:
    seen: set[str] = set()
    stack = list(upstream[stage])
    while stack:
        parent = stack.pop()
        if parent not in seen:
            seen.add(parent)
            stack.extend(upstream[parent])
    return seen


def dvc_stage_runner(root: Path, log_dir: Path) -> Callable[[str], bool]:
    """`run_stage` for `schedule`: ``dvc repro --single-item`` in `root`, output to a log."""
    log_dir.mkdir(parents=True, exist_ok=True)

    def run(stage: str) -> bool:
        log = log_dir / f"{stage.replace('/', '_')}.log"
        command = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item"]
        with log.open("w") as out:
            result = subprocess.run(
                [*command, stage], cwd=root, stdout=out, stderr=subprocess.STDOUT
            )
        return result.returncode == 0

    return run


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def reproduce(root: Path, targets: Iterable[str] = (), jobs: int | None = None) -> Outcome:
    """Bring the project in `root` up to date as `dvc repro` would, `jobs` stages at once
    (default: one per core), with a progress bar over the stages."""
    from tqdm import tqdm

    pipeline = read_pipeline(root, targets)
    jobs = jobs or default_jobs()
    log_dir = root / LOG_DIR
    bar = tqdm(total=len(pipeline.upstream), unit="stage", dynamic_ncols=True)
    active: set[str] = set()

    def report(stage: str, event: str, outcome: Outcome) -> None:
        if event == "start":
            active.add(stage)
        else:
            active.discard(stage)
            bar.update()
        if event == "done":
            bar.write(f"{stage}: ran in {outcome.seconds[stage]:.1f} s")
        bar.set_postfix_str(", ".join(sorted(active)))

    started = time.perf_counter()
    outcome = schedule(pipeline, dvc_stage_runner(root, log_dir), jobs, report)
    bar.close()
    minutes = (time.perf_counter() - started) / 60
    if outcome.failed is None:
        print(
            f"{len(outcome.ran)} stages ran, {len(outcome.skipped)} were up to date; "
            f"{minutes:.1f} min with {jobs} at once"
        )
    return outcome


def failure_message(root: Path, stage: str, lines: int = 15) -> str:
    """The failed stage and the last lines of its log."""
    log = root / LOG_DIR / f"{stage.replace('/', '_')}.log"
    tail = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
    return "\n".join([f"error: stage {stage} failed (log: {log})", *tail])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="stages to bring up to date (default: all)")
    parser.add_argument(
        "-j", "--jobs", type=int, default=None, help="stages at once (default: one per core)"
    )
    parser.add_argument("--project", default=".", help="the DVC project (default: here)")
    args = parser.parse_args(argv)
    root = Path(args.project).resolve()
    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        sys.exit(2)
    if not (root / "dvc.yaml").is_file():
        print(f"error: {root} has no dvc.yaml; run from the project root", file=sys.stderr)
        sys.exit(1)
    try:
        outcome = reproduce(root, args.targets, args.jobs)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        sys.exit(1)
    if outcome.failed is not None:
        print(failure_message(root, outcome.failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
