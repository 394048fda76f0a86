"""metalab-repro: DVC's stages side by side, in dependency order, as `dvc repro` decides."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from metalab.repro import Pipeline, downstream_counts, reproduce, schedule

#   fetch -> prepare -> train_a -> report
#                    -> train_b ->
DIAMOND = {
    "fetch": set(),
    "prepare": {"fetch"},
    "train_a": {"prepare"},
    "train_b": {"prepare"},
    "report": {"train_a", "train_b"},
}


class Recorder:
    """A fake stage runner that records start/end order and can fail or meet a partner."""

    def __init__(self, fail: str | None = None, together: tuple[str, ...] = ()):
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail = fail
        self.barrier = threading.Barrier(len(together)) if together else None
        self.together = together

    def __call__(self, stage: str) -> bool:
        with self.lock:
            self.events.append(("start", stage))
        if stage in self.together:
            self.barrier.wait(timeout=5)  # breaks (raises) unless both run at once
        time.sleep(0.01)
        with self.lock:
            self.events.append(("end", stage))
        return stage != self.fail

    def started(self) -> list[str]:
        return [stage for event, stage in self.events if event == "start"]


def commands(upstream):
    return set(upstream)


def test_every_stage_starts_after_its_inputs_and_independent_ones_run_at_once():
    runner = Recorder(together=("train_a", "train_b"))
    pipeline = Pipeline(DIAMOND, changed={"fetch"}, commands=commands(DIAMOND))
    outcome = schedule(pipeline, runner, jobs=2)
    assert outcome.failed is None and sorted(outcome.ran) == sorted(DIAMOND)
    position = {(event, stage): i for i, (event, stage) in enumerate(runner.events)}
    for stage, parents in DIAMOND.items():
        for parent in parents:
            assert position[("end", parent)] < position[("start", stage)]


def test_one_job_never_runs_two_stages_at_once():
    runner = Recorder()
    schedule(Pipeline(DIAMOND, {"fetch"}, commands(DIAMOND)), runner, jobs=1)
    kinds = [event for event, _ in runner.events]
    assert kinds == ["start", "end"] * len(DIAMOND)


def test_only_what_dvc_found_changed_and_what_is_below_it_runs():
    runner = Recorder()
    outcome = schedule(Pipeline(DIAMOND, {"train_b"}, commands(DIAMOND)), runner, jobs=2)
    assert sorted(outcome.ran) == ["report", "train_b"]
    assert sorted(outcome.skipped) == ["fetch", "prepare", "train_a"]
    nothing = schedule(Pipeline(DIAMOND, set(), commands(DIAMOND)), Recorder(), jobs=2)
    assert nothing.ran == [] and len(nothing.skipped) == len(DIAMOND)


def test_a_stage_without_command_is_never_run():
    upstream = {"data.dvc": set(), "train": {"data.dvc"}}
    outcome = schedule(Pipeline(upstream, {"data.dvc", "train"}, {"train"}), Recorder(), 1)
    assert outcome.ran == ["train"] and outcome.skipped == ["data.dvc"]


def test_a_failure_starts_nothing_new_and_names_the_stage():
    runner = Recorder(fail="train_a")
    outcome = schedule(Pipeline(DIAMOND, {"fetch"}, commands(DIAMOND)), runner, jobs=1)
    assert outcome.failed == "train_a"  # train_a before train_b: same priority, by name
    assert "train_b" not in runner.started()  # was ready, but nothing starts after a failure
    assert "report" not in runner.started() and "report" not in outcome.skipped


def test_the_stage_with_most_downstream_starts_first():
    upstream = {"leaf": set(), "body": set(), "a": {"body"}, "b": {"body"}, "c": {"a"}}
    assert downstream_counts(upstream) == {"leaf": 0, "body": 3, "a": 1, "b": 0, "c": 0}
    runner = Recorder()
    schedule(Pipeline(upstream, set(upstream), set(upstream)), runner, jobs=1)
    assert runner.started()[0] == "body"


def test_a_cycle_is_refused_before_anything_runs():
    runner = Recorder()
    with pytest.raises(ValueError, match="cycle"):
        schedule(Pipeline({"a": {"b"}, "b": {"a"}}, {"a"}, {"a", "b"}), runner, jobs=2)
    assert runner.events == []


# A real DVC project: `first` feeds `left` and `right` (each records when it ran and
# sleeps, so running side by side shows as overlapping intervals), `join` reads both.
STAGE = """import json, sys, time
name, inputs = sys.argv[1], sys.argv[2:]
start = time.time()
time.sleep(1.0)
text = "".join(open(f).read() for f in inputs) + open("params.yaml").read()
open(f"{name}.out", "w").write(text + name)
json.dump({"start": start, "end": time.time()}, open(f"{name}.time", "w"))
"""


def dvc_project(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "stage.py").write_text(STAGE)
    (root / "params.yaml").write_text(yaml.safe_dump({"left": 1, "right": 1}))

    def stage(name, inputs, params=()):
        return {
            "cmd": " ".join(["python stage.py", name, *inputs]),
            "deps": ["stage.py", *inputs],
            "params": list(params),
            "outs": [f"{name}.out", {f"{name}.time": {"cache": False}}],
        }

    stages = {
        "first": stage("first", []),
        "left": stage("left", ["first.out"], ["left"]),
        "right": stage("right", ["first.out"], ["right"]),
        "join": stage("join", ["left.out", "right.out"]),
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))


def interval(root: Path, name: str) -> tuple[float, float]:
    times = yaml.safe_load((root / f"{name}.time").read_text())
    return times["start"], times["end"]


def test_a_real_dvc_project_ends_up_to_date_with_independent_stages_overlapping(tmp_path):
    from dvc.repo import Repo

    dvc_project(tmp_path)
    outcome = reproduce(tmp_path, jobs=2)
    assert outcome.failed is None and sorted(outcome.ran) == ["first", "join", "left", "right"]
    (left_start, left_end), (right_start, right_end) = (
        interval(tmp_path, "left"),
        interval(tmp_path, "right"),
    )
    assert left_start < right_end and right_start < left_end  # side by side
    assert interval(tmp_path, "first")[1] <= min(left_start, right_start)
    assert interval(tmp_path, "join")[0] >= max(left_end, right_end)
    with Repo(str(tmp_path)) as repo:
        assert repo.status() == {}  # dvc.lock records every stage as `dvc repro` would
    assert set(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]) == {
        "first",
        "left",
        "right",
        "join",
    }

    rerun = reproduce(tmp_path, jobs=2)
    assert rerun.ran == [] and len(rerun.skipped) == 4

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"left": 1, "right": 2}))
    changed = reproduce(tmp_path, jobs=2)
    assert sorted(changed.ran) == ["join", "right"]
    assert "right: 2" in (tmp_path / "join.out").read_text()

    only_left = reproduce(tmp_path, targets=["left"], jobs=2)
    assert only_left.ran == [] and sorted(only_left.skipped) == ["first", "left"]


def test_the_command_names_a_failing_stage_and_an_unknown_target(tmp_path):
    dvc_project(tmp_path)
    (tmp_path / "stage.py").write_text("import sys\nprint('boom in', sys.argv[1])\nsys.exit(3)\n")
    command = [sys.executable, "-m", "metalab.repro", "--project", str(tmp_path)]
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "error: stage first failed" in failed.stderr and "boom in first" in failed.stderr
    unknown = subprocess.run([*command, "nope"], capture_output=True, text=True)
    assert unknown.returncode == 1
    assert "no stage 'nope' in dvc.yaml" in unknown.stderr.splitlines()[-1]
    bad_jobs = subprocess.run([*command, "-j", "0"], capture_output=True, text=True)
    assert bad_jobs.returncode == 2 and "--jobs must be at least 1" in bad_jobs.stderr
