"""Extra training seeds of the vision experiments (params.yaml `seed_runs`): validated on
load, one train and one evaluate stage per entry in dvc.yaml that reads only its
experiment's params, and a train stage run that writes the seed's own files."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_evaluation import load_stage

from metalab.params import ParamsError, load_params, run_name, validate_params
from metalab.records import TrainSummary

ROOT = Path(__file__).resolve().parents[1]
RANDOM = "src/metalab/models"


def raw_params(seed_runs: dict, **experiment_train) -> dict:
    return {
        "experiments": {
            "a": {"algorithm": "protonets", "body_init": RANDOM, "train": experiment_train},
            "b": {"algorithm": "protonets", "body_init": "models/pretrain"},
        },
        "seed_runs": seed_runs,
    }


def run(experiment: str, seed: int, body_init: str = RANDOM) -> dict:
    return {"experiment": experiment, "seed": seed, "body_init": body_init}


@pytest.mark.parametrize(
    ("seed_runs", "experiment_train", "message"),
    [
        (
            {"c-s1": run("c", 1)},
            {},
            "seed_runs.c-s1.experiment = c: no such experiment; known: a, b",
        ),
        (
            {"a-1": run("a", 1)},
            {},
            "seed_runs.a-1 = a-1: a seed run is keyed <experiment>-s<seed>: a-s1",
        ),
        ({"a-s0": run("a", 0)}, {}, "seed_runs.a-s0.seed = 0: the seed of a's own run"),
        ({"a-s3": run("a", 3)}, {"seed": 3}, "seed_runs.a-s3.seed = 3: the seed of a's own run"),
        (
            {"b-s1": run("b", 1)},
            {},
            "seed_runs.b-s1.body_init = src/metalab/models: must be b's: models/pretrain",
        ),
        ({"a-s1": {"experiment": "a", "seed": 1}}, {}, "seed_runs.a-s1.body_init"),
    ],
)
def test_a_seed_run_names_its_experiment_and_a_new_seed(seed_runs, experiment_train, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        validate_params(raw_params(seed_runs, **experiment_train))


def test_a_seed_run_key_that_is_an_experiment_name_is_refused():
    raw = raw_params({"a-s1": run("a", 1)})
    raw["experiments"]["a-s1"] = {"algorithm": "protonets", "body_init": RANDOM}
    with pytest.raises(ParamsError, match="also an experiment's name"):
        validate_params(raw)


def test_seeded_params_train_the_run_under_its_own_name_with_its_seed():
    params = validate_params(raw_params({"a-s2": run("a", 2)}))
    assert params.seeded("a", None) == ("a", params)
    name, seeded = params.seeded("a", 2)
    assert name == run_name("a", 2) == "a-s2"
    assert seeded.train_config("a-s2").seed == 2
    # everything else as the experiment's own run; the original params untouched
    assert seeded.train_config("a-s2").model_copy(update={"seed": 0}) == params.train_config("a")
    assert seeded.experiment("a-s2").options == params.experiment("a").options
    assert "a-s2" not in params.experiments and params.train_config("a").seed == 0
    with pytest.raises(ParamsError, match="--seed 0: experiments.a already trains with seed 0"):
        params.seeded("a", 0)


# ------------------------------------------------------------------------ dvc.yaml
@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def _params(stage) -> set[str]:
    return {key for dep in stage.deps if hasattr(dep, "params") for key in dep.params}


def _paths(entries) -> set[str]:
    return {str(entry.def_path) for entry in entries if not hasattr(entry, "params")}


def test_every_seed_run_has_its_stages_reading_only_its_experiment(dvc_stages):
    params = load_params(ROOT / "params.yaml")
    assert {"maml", "protonets", "anil_s4"} <= {run.experiment for run in params.seed_runs.values()}
    seed_stages = {
        name for name in dvc_stages if name.startswith(("train_seed@", "evaluate_seed@"))
    }
    assert seed_stages == {
        f"{kind}@{key}" for key in params.seed_runs for kind in ("train_seed", "evaluate_seed")
    }
    for key, entry in params.seed_runs.items():
        experiment = entry.experiment
        train, evaluate = dvc_stages[f"train_seed@{key}"], dvc_stages[f"evaluate_seed@{key}"]
        own_train, own_evaluate = (
            dvc_stages[f"train@{experiment}"],
            dvc_stages[f"evaluate@{experiment}"],
        )
        # the experiment's own stages' params and code, the seed on the command line
        assert (
            _params(train)
            == _params(own_train)
            == {"data.split", "train", f"experiments.{experiment}"}
        )
        assert _params(evaluate) == _params(own_evaluate)
        assert train.cmd == f"python stages/train.py {experiment} --seed {entry.seed}"
        assert evaluate.cmd.startswith(
            f"python stages/evaluate.py {experiment} --seed {entry.seed}"
        )
        assert _paths(train.deps) == _paths(own_train.deps)  # incl. its body_init
        renamed = {
            path.replace(f"/{experiment}.", f"/{key}.") for path in _paths(own_evaluate.deps)
        }
        assert _paths(evaluate.deps) == renamed
        for own, seeded in ((own_train, train), (own_evaluate, evaluate)):
            assert _paths(seeded.outs) == {
                path.replace(f"/{experiment}.", f"/{key}.") for path in _paths(own.outs)
            }


def test_no_stage_reads_the_seed_run_list(dvc_stages):
    """So adding or removing a seed run changes no other stage (the report finds the runs'
    files in metrics/, its dependency)."""
    for name, stage in dvc_stages.items():
        assert not any(key.startswith("seed_runs") for key in _params(stage)), name
    report = _paths(dvc_stages["report"].deps)
    assert {"metrics/train", "metrics/eval", "plots/train"} <= report


# ---------------------------------------------------------------------- the stage
def test_train_stage_with_a_seed_writes_that_runs_files(tiny_prefetched_28, tmp_path, monkeypatch):
    (tmp_path / "data" / "prefetched").mkdir(parents=True)
    shutil.copy(tiny_prefetched_28, tmp_path / "data" / "prefetched" / "omniglot.npz")
    raw = {
        "data": {"split": {"validation_characters": 5}},
        "train": {
            "n_way": 3,
            "query_per_class": 2,
            "meta_batch_size": 2,
            "iterations": 3,
            "validate_every": 1,
            "validation_episodes": 2,
            "checkpoint_every": 3,
            "threads": 1,
        },
        "experiments": {
            "tiny": {"algorithm": "protonets", "body_init": RANDOM, "model": {"hidden": 4}}
        },
        "seed_runs": {"tiny-s1": run("tiny", 1)},
        "tracking": {"enabled": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    stage = load_stage("train")
    for seed in (None, 1):
        args = argparse.Namespace(experiment="tiny", seed=seed, no_progress=True)
        stage.main(args, load_params("params.yaml"))

    own = TrainSummary.read(tmp_path / "metrics" / "train" / "tiny.json")
    seeded = TrainSummary.read(tmp_path / "metrics" / "train" / "tiny-s1.json")
    assert (own.experiment, own.seed) == ("tiny", 0)
    assert (seeded.experiment, seeded.seed) == ("tiny", 1)
    models = [
        torch.load(tmp_path / "models" / f"{n}.pt", weights_only=False) for n in ("tiny", "tiny-s1")
    ]
    first, second = (m["state_dict"] for m in models)
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another initialisation
    assert (tmp_path / "checkpoints" / "tiny-s1.pt").is_file()
    for name, summary in (("tiny", own), ("tiny-s1", seeded)):
        curve = pd.read_csv(tmp_path / "plots" / "train" / f"{name}.csv")
        seconds = curve["seconds"].to_numpy()
        # busy seconds after each step: increasing, ending at the summary's training time
        assert (seconds > 0).all() and (seconds[1:] > seconds[:-1]).all()
        assert seconds[-1] == pytest.approx(summary.training_seconds)
