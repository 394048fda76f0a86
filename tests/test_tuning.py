"""metalab-tune: every experiment gets the same sweep, trials are selected on validation
accuracy only from rows that ran with their settings, and the choice lands in params.yaml
with its comments kept. One test drives DVC's real experiment queue."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metalab import tuning
from metalab.params import load_params
from metalab.schema import ParamsError
from metalab.tuning import Trial

ROOT = Path(__file__).resolve().parents[1]
# params.yaml as it stood before the first sweep: the tests below assert rates such as
# maml's inner_lr 0.4 and protonets inheriting meta_lr, which the sweep's choices change.
PINNED = Path(__file__).resolve().parent / "fixtures" / "params_before_tuning.yaml"


@pytest.fixture(scope="module")
def params():
    return load_params(PINNED)


def test_every_experiment_gets_the_same_trials():
    params = load_params(ROOT / "params.yaml")  # the live file, with its chosen rates
    trials = tuning.plan(params)
    factors = params.tuning.factors
    swept = [name for name in params.experiments if name not in params.tuning.follows]
    assert len(trials) == len(factors) * len(swept)
    assert len({trial.name for trial in trials}) == len(trials)
    for name in swept:
        runs = [trial for trial in trials if trial.experiment == name]
        assert [run.factor for run in runs] == factors
        budget = params.train_config(name).iterations
        assert {run.iterations for run in runs} == {
            math.ceil(params.tuning.budget_fraction * budget)
        }
        for path in params.tuning.rates[name]:
            current = tuning.current_rate(params, name, path)
            assert [run.values[path] for run in runs] == [current * f for f in factors]


def test_the_pinned_copy_differs_from_params_yaml_only_in_swept_rates():
    """Keeps the fixture honest: rebuild the live file from the pinned one by setting
    each swept rate to its live value."""
    live, pinned = (yaml.safe_load(path.read_text()) for path in (ROOT / "params.yaml", PINNED))
    rates = live["tuning"]["rates"]
    followers = {name: rates[leader] for name, leader in live["tuning"]["follows"].items()}
    for name, paths in {**rates, **followers}.items():
        for path in paths:
            section, key = path.split(".")
            value = live["experiments"][name].get(section, {}).get(key)
            if value is not None:
                pinned["experiments"][name].setdefault(section, {})[key] = value
    assert pinned == live, "update tests/fixtures/params_before_tuning.yaml to match"


def test_rates_resolve_through_the_train_section(params):
    # protonets sets no meta_lr of its own: the train section's is the current one
    assert tuning.current_rate(params, "protonets", "train.meta_lr") == params.train.meta_lr
    assert tuning.current_rate(params, "maml", "options.inner_lr") == 0.4


def test_an_experiment_without_rates_or_with_a_bad_path_is_refused(params):
    rates = dict(params.tuning.rates)
    del rates["leo"]
    missing = params.model_copy(
        update={"tuning": params.tuning.model_copy(update={"rates": rates})}
    )
    with pytest.raises(ParamsError, match="tuning.rates: no entry for leo"):
        tuning.plan(missing)
    with pytest.raises(ParamsError, match=r"tuning.rates.maml: options.inner_steps_x"):
        tuning.current_rate(params, "maml", "options.inner_steps_x")
    with pytest.raises(ParamsError, match="no experiment named nope"):
        tuning.plan(params, ["nope"])


def test_a_follower_takes_its_leaders_choice_and_gets_no_sweep(tmp_path, monkeypatch, params):
    assert params.tuning.follows == {"maml_bf16": "maml"}
    assert not [t for t in tuning.plan(params) if t.experiment == "maml_bf16"]
    with pytest.raises(ParamsError, match="maml_bf16 takes maml's choice; sweep maml"):
        tuning.plan(params, ["maml_bf16"])
    shutil.copy(PINNED, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    trials = tuning.plan(params, ["maml"])
    rows = [row(t, acc) for t, acc in zip(trials, (0.7, 0.8, 0.9), strict=True)]
    assert tuning.main(["collect", "maml", "--apply"], rows=lambda commits: rows) == 0
    applied = load_params("params.yaml")
    assert applied.experiment("maml").options.inner_lr == 0.8
    assert applied.experiment("maml_bf16").options.inner_lr == 0.8
    assert "| maml_bf16 | follows maml |" in (tmp_path / "reports/tuning.md").read_text()


def test_a_params_file_with_fewer_experiments_still_loads(tmp_path):
    """The smoke run and the e2e test trim the experiments; their rates entries stay."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["experiments"] = {"maml": raw["experiments"]["maml"]}
    raw["report"]["pairs"] = []
    raw["seed_runs"] = {  # extra seeds name their experiment: keep only maml's
        key: run for key, run in raw.get("seed_runs", {}).items() if run["experiment"] == "maml"
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    trimmed = load_params(path)
    assert [trial.experiment for trial in tuning.plan(trimmed)] == ["maml"] * 3


def trial(experiment: str, index: int, factor: float, lr: float, iterations: int = 10) -> Trial:
    return Trial(experiment, index, factor, {"options.inner_lr": lr}, iterations)


def row(t: Trial, accuracy: float, **changes: float) -> dict:
    """An exp_show row of trial `t` as DVC writes it (ints come back as floats)."""
    metric = f"metrics/train/{t.experiment}.json:{tuning.SELECTION_METRIC}"
    result = {"Experiment": t.name, metric: accuracy}
    result.update({key: float(value) for key, value in t.overrides().items()})
    result.update(changes)
    return result


def test_selection_takes_the_best_validation_accuracy_of_matching_rows():
    trials = [trial("a", 0, 0.5, 0.2), trial("a", 1, 1.0, 0.4), trial("a", 2, 2.0, 0.8)]
    trials += [trial("b", 0, 0.5, 0.1), trial("b", 1, 1.0, 0.2), trial("b", 2, 2.0, 0.4)]
    stale = row(trials[2], 0.99, **{"experiments.a.options.inner_lr": 1.6})  # other sweep
    rows = [stale, row(trials[0], 0.7), row(trials[1], 0.8), row(trials[2], 0.75)]
    rows += [row(trials[3], 0.6), row(trials[4], 0.6), row(trials[5], -1.0)]  # never validated
    results = tuning.trial_results(trials, rows)
    assert results == {
        "tune-a-f0": 0.7,
        "tune-a-f1": 0.8,
        "tune-a-f2": 0.75,
        "tune-b-f0": 0.6,
        "tune-b-f1": 0.6,
    }
    chosen = tuning.select(trials, results)
    assert chosen == {"a": trials[1]}  # b is pending: its third trial has no result
    results["tune-b-f2"] = 0.6  # a three-way tie goes to the current value
    assert tuning.select(trials, results)["b"] == trials[4]


def test_a_tie_between_other_factors_goes_to_the_one_nearest_one():
    trials = [trial("a", 0, 0.25, 0.1), trial("a", 1, 2.0, 0.8)]
    assert tuning.select(trials, {"tune-a-f0": 0.5, "tune-a-f1": 0.5})["a"] == trials[1]


def test_queue_command_runs_only_the_train_stage_with_the_overrides():
    command = tuning.queue_command(trial("maml", 1, 1.0, 0.4, iterations=103))
    assert command[:6] == ["dvc", "exp", "run", "--queue", "--name", "tune-maml-f1"]
    assert command[-2:] == ["--single-item", "train@maml"]  # no upstream stage reruns
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set-param"]
    assert sets == [
        "experiments.maml.options.inner_lr=0.4",
        "experiments.maml.train.iterations=103",
        "experiments.maml.train.validate_every=103",
    ]


def test_report_marks_the_chosen_trial_and_pending_ones(params):
    trials = tuning.plan(params, ["maml", "leo"])
    maml = [t for t in trials if t.experiment == "maml"]
    results = {maml[0].name: 0.81, maml[1].name: 0.86, maml[2].name: 0.84}
    text = tuning.render(trials, results, params)
    maml_row = next(line for line in text.splitlines() if line.startswith("| maml "))
    assert "**0.4: 0.8600**" in maml_row and maml_row.endswith("| 0.4 |")
    leo_row = next(line for line in text.splitlines() if line.startswith("| leo "))
    assert leo_row.count("pending") == 4
    assert "edge of the grid" not in text  # the middle factor won


@pytest.mark.parametrize(("best", "edge"), [(0, "lowest"), (2, "highest")])
def test_report_marks_a_choice_at_the_edge_of_the_grid(params, best, edge):
    trials = tuning.plan(params, ["maml"])
    results = {t.name: (0.9 if i == best else 0.8) for i, t in enumerate(trials)}
    text = tuning.render(trials, results, params)
    maml_row = next(line for line in text.splitlines() if line.startswith("| maml "))
    assert maml_row.endswith(f" ({edge} tried) |")
    assert f"Chosen at the edge of the grid: maml ({edge})." in text


def test_apply_writes_the_choice_and_keeps_everything_else(tmp_path, params):
    path = tmp_path / "params.yaml"
    shutil.copy(PINNED, path)
    before_text = path.read_text()
    before = yaml.safe_load(before_text)
    chosen = {
        "maml": trial("maml", 0, 0.5, 0.2),  # its own value, in a flow mapping
        "protonets": Trial("protonets", 2, 2.0, {"train.meta_lr": 0.002}, 44),  # inherited
        "mamlpp": Trial("mamlpp", 0, 0.5, {"options.inner_lr": 5e-05}, 1),  # block mapping
    }
    changed = tuning.apply_choices(path, chosen)
    assert changed == [
        "experiments.maml.options.inner_lr=0.2",
        "experiments.protonets.train.meta_lr=0.002",
        "experiments.mamlpp.options.inner_lr=5e-05",
    ]
    text = path.read_text()
    # A text edit, not a re-dump: exactly three lines differ (in file order: maml, mamlpp,
    # protonets), each only by its value or by one appended entry; comments, wrapping and
    # null spellings stay byte for byte.
    differing = [
        (old, new)
        for old, new in zip(before_text.splitlines(), text.splitlines(), strict=True)
        if old != new
    ]
    assert len(differing) == 3
    assert differing[0][1] == differing[0][0].replace("inner_lr: 0.4", "inner_lr: 0.2")
    assert differing[1][1] == differing[1][0].replace("0.4", "5.0e-05")  # a float in YAML 1.1
    assert differing[2][1] == differing[2][0].removesuffix("}") + ", meta_lr: 0.002}"
    after = yaml.safe_load(text)
    before["experiments"]["maml"]["options"]["inner_lr"] = 0.2
    before["experiments"]["protonets"]["train"]["meta_lr"] = 0.002
    before["experiments"]["mamlpp"]["options"]["inner_lr"] = 5e-05
    assert after == before  # nothing else moved (anchors and merges resolve alike)
    reloaded = load_params(path)
    assert reloaded.train_config("protonets").meta_lr == 0.002
    assert reloaded.train_config("maml").meta_lr == params.train.meta_lr
    assert reloaded.experiment("mamlpp").options.inner_lr == 5e-05


def test_apply_adds_an_inherited_key_to_a_block_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "x: &base {meta_lr: null}\n"
        "experiments:\n"
        "  a:\n"
        "    train:\n"
        "      <<: *base\n"
        "      iterations: 10  # kept\n"
    )
    tuning.apply_choices(path, {"a": Trial("a", 0, 0.5, {"train.meta_lr": 1.0}, 4)})
    assert path.read_text().splitlines()[4:] == [
        "      <<: *base",
        "      meta_lr: 1.0",
        "      iterations: 10  # kept",
    ]
    assert yaml.safe_load(path.read_text())["experiments"]["a"]["train"]["meta_lr"] == 1.0


def test_apply_refuses_a_missing_mapping_and_leaves_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    text = "experiments:\n  a: {algorithm: protonets}\n"
    path.write_text(text)
    with pytest.raises(ParamsError, match=r"experiments.a has no `train` mapping"):
        tuning.apply_choices(path, {"a": Trial("a", 0, 0.5, {"train.meta_lr": 0.1}, 4)})
    assert path.read_text() == text


def test_yaml_float_is_read_back_as_a_float_by_yaml_1_1():
    for value in (5e-05, 1.0, 0.2, 2e-3, 100.0, 1.5e-7, 12345678.0):
        spelled = tuning.yaml_float(value)
        read = yaml.safe_load(f"v: {spelled}")["v"]
        assert isinstance(read, float) and read == pytest.approx(value, rel=1e-5), spelled


def test_the_record_keeps_finished_trials_across_clones(tmp_path, monkeypatch, params):
    """A sweep outlasting a session: `collect` copies finished trials from DVC's refs into
    the record; a later `queue` skips them and a later `collect` (with refs gone) still
    counts them, but not a recorded trial of other settings."""
    shutil.copy(PINNED, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    trials = tuning.plan(params, ["maml"])
    first = [row(trials[0], 0.9), row(trials[1], 0.8)]
    assert tuning.main(["collect", "maml"], rows=lambda commits: first) == 0
    record = json.loads((tmp_path / tuning.RECORD).read_text())
    assert [entry["trial"] for entry in record] == ["tune-maml-f0", "tune-maml-f1"]
    commands: list[list[str]] = []
    assert tuning.main(["queue", "maml"], run=lambda c: commands.append(c) or 0) == 0
    assert [c[5] for c in commands] == ["tune-maml-f2"]
    assert (
        tuning.main(["collect", "maml", "--apply"], rows=lambda commits: [row(trials[2], 0.7)]) == 0
    )
    assert "**0.2: 0.9000**" in (tmp_path / "reports/tuning.md").read_text()
    assert load_params("params.yaml").experiment("maml").options.inner_lr == 0.2
    # After --apply the grid is centred on 0.2: the trials at 0.2 and 0.4 are in the record
    # under other names (their settings identify them), so the next round queues only 0.1.
    commands.clear()
    assert tuning.main(["queue", "maml"], run=lambda c: commands.append(c) or 0) == 0
    assert [c[5] for c in commands] == ["tune-maml-f0"]
    assert "experiments.maml.options.inner_lr=0.1" in commands[0]
    assert tuning.recorded_results(tuning.plan(load_params("params.yaml"), ["maml"]), record) == {
        "tune-maml-f1": 0.9,
        "tune-maml-f2": 0.8,
    }


def test_a_damaged_record_is_named(tmp_path, monkeypatch, capsys):
    shutil.copy(PINNED, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / tuning.RECORD).write_text("{not json")
    assert tuning.main(["collect", "maml"], rows=lambda commits: []) == 1
    assert "reports/tuning_trials.json: not JSON" in capsys.readouterr().err


def test_command_queues_each_trial_and_collects(tmp_path, monkeypatch, params):
    shutil.copy(PINNED, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    commands: list[list[str]] = []
    assert tuning.main(["queue", "maml"], run=lambda c: commands.append(c) or 0) == 0
    assert [c[5] for c in commands] == ["tune-maml-f0", "tune-maml-f1", "tune-maml-f2"]
    assert tuning.main(["queue", "maml"], run=lambda c: 1) == 1

    trials = tuning.plan(params, ["maml"])
    rows = [row(t, acc) for t, acc in zip(trials, (0.9, 0.8, 0.7), strict=True)]
    assert tuning.main(["collect", "maml", "--apply"], rows=lambda commits: rows) == 0
    assert "**0.2: 0.9000**" in (tmp_path / "reports/tuning.md").read_text()
    assert load_params("params.yaml").experiment("maml").options.inner_lr == 0.2


def test_bad_params_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("tuning: {factors: [1.0]}\n")
    assert tuning.main(["plan"]) == 2
    assert "tuning.factors" in capsys.readouterr().err


TRAIN = """
import json, pathlib, sys, yaml
name = sys.argv[1]
experiment = yaml.safe_load(open("params.yaml"))["experiments"][name]
accuracy = 1 - abs(experiment["options"]["inner_lr"] - 0.3)
pathlib.Path("metrics/train").mkdir(parents=True, exist_ok=True)
json.dump({"best_validation_accuracy": accuracy}, open(f"metrics/train/{name}.json", "w"))
"""
DVC_YAML = """
stages:
  train:
    foreach: ${experiments}
    do:
      cmd: python train.py ${key}
      deps:
        - train.py
      params:
        - experiments.${key}
      metrics:
        - metrics/train/${key}.json:
            cache: false
"""


@pytest.mark.slow
def test_trials_run_in_dvcs_queue_and_are_read_back(tmp_path, monkeypatch):
    """A two-experiment DVC project: the queue commands are accepted, DVC runs them, and
    `dvc.api.exp_show` rows give each trial its own accuracy (about 40 s)."""
    monkeypatch.chdir(tmp_path)

    def sh(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "test@example.com")
    sh("git", "config", "user.name", "test")
    sh("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text(
        "experiments:\n"
        "  a: {options: {inner_lr: 0.4}, train: {iterations: 10, validate_every: 5}}\n"
        "  b: {options: {inner_lr: 0.1}, train: {iterations: 10, validate_every: 5}}\n"
    )
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    sh(sys.executable, "-m", "dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    trials = [trial("a", 0, 0.5, 0.2, iterations=4), trial("a", 1, 2.0, 0.8, iterations=4)]
    for t in trials:
        sh(*tuning.queue_command(t))
    sh("dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True)
        if "Queued" not in status.stdout and "Running" not in status.stdout:
            break
        time.sleep(2)
    assert "Failed" not in status.stdout, status.stdout
    results = tuning.trial_results(trials, tuning.exp_show_rows())
    assert results == pytest.approx({"tune-a-f0": 0.9, "tune-a-f1": 0.5})
    assert tuning.select(trials, results)["a"] == trials[0]
    sh("dvc", "queue", "stop")


def test_collect_reads_the_trials_of_as_many_commits_as_asked(tmp_path, monkeypatch, params):
    shutil.copy(PINNED, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    asked = []
    tuning.main(["collect", "maml"], rows=lambda commits: asked.append(commits) or [])
    tuning.main(["collect", "maml", "--commits", "3"], rows=lambda c: asked.append(c) or [])
    assert asked == [1, 3]
