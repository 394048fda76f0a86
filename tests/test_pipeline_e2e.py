"""End to end: `dvc repro` in a throwaway git repo on tiny generated Omniglot archives.

Download -> prefetch -> episodes, where a param change reruns only the stages it affects;
and the whole pipeline (pretrain, train, evaluate, report too) with two tiny experiments,
whose second `dvc repro` runs nothing.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omniglot_fixture import expected_counts

from metalab.records import DataMetrics, TrainSummary, info_path

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_params(archive_dir: Path) -> dict:
    counts = expected_counts(background=(4, 5), evaluation=(3, 4), drawings=20)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        sources=[str(archive_dir / "no-such-mirror"), str(archive_dir)],
        expected={name: vars(count) for name, count in counts.items()},
        prefetch_workers=1,
    )
    params["data"]["split"].update(validation_characters=5)
    params["episodes"].update(settings=["5w1s", "3w2s"], num_episodes=12, query_per_class=3)
    params["pretrain"].update(model={"name": "conv4", "hidden": 8}, epochs=1, batch_size=64)
    params["train"].update(
        n_way=3,
        query_per_class=2,
        meta_batch_size=2,
        iterations=4,
        validate_every=2,
        validation_episodes=3,
        checkpoint_every=2,
        threads=1,
        precision="fp32",
    )
    params["experiments"] = {
        "tiny": {
            "algorithm": "protonets",
            "body_init": "src/metalab/models",
            "model": {"hidden": 8},
        }
    }
    # the project's seed runs and tuning rates name experiments replaced here
    params["seed_runs"] = {}
    params.get("tuning", {}).pop("rates", None)
    return params


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],  # the dvc of this interpreter, venv or not
        cwd=repo,
        capture_output=True,
        text=True,
        # The stages' `python` is this interpreter too, even in an unactivated venv.
        env=os.environ
        | {
            "DVC_NO_ANALYTICS": "1",
            "OMP_NUM_THREADS": "1",  # tiny stages on a shared machine: no thread pools
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture
def repo(tmp_path, tiny_omniglot_dir, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "stages", "src"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / item)
    (repo / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(Path(tiny_omniglot_dir)), sort_keys=False)
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    return repo


def numbers_only(value) -> bool:
    """Whether every leaf of JSON `value` is a number, a boolean or null."""
    if isinstance(value, dict):
        return all(numbers_only(item) for item in value.values())
    return value is None or isinstance(value, int | float)


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> set[str]:
    return {
        stage
        for stage in ("download", "prefetch", "episodes")
        if f"Running stage '{stage}'" in output
    }


def test_repro_builds_data_and_reruns_only_affected_stages(repo):
    first = dvc(repo, "repro", "episodes")
    assert ran(first) == {"download", "prefetch", "episodes"}

    data = DataMetrics.read(repo / "metrics" / "data.json").to_dict()  # with data.info.json
    assert data["images_background"]["drawings"] == 400
    assert data["images_evaluation"]["characters"] == 12
    assert len(data["images_background"]["sha256"]) == 64
    with np.load(repo / "data" / "prefetched" / "omniglot.npz") as prefetched:
        assert prefetched["images"].shape == (640, 28, 28)
    with np.load(repo / "data" / "episodes" / "3w2s.npz") as episodes:
        assert episodes["image_index"].shape == (12, 3, 5)

    assert ran(dvc(repo, "repro", "episodes")) == set()  # nothing changed, nothing runs

    set_param(repo, "episodes", "num_episodes", 7)
    assert ran(dvc(repo, "repro", "episodes")) == {"episodes"}

    set_param(repo, "data", "image_size", 105)
    assert ran(dvc(repo, "repro", "episodes")) == {"prefetch", "episodes"}
    with np.load(repo / "data" / "prefetched" / "omniglot.npz") as prefetched:
        assert prefetched["images"].shape == (640, 105, 105)


# ------------------------------------------------------------------- the whole pipeline
EXPERIMENTS = {
    "maml": {
        "algorithm": "maml",
        "body_init": "src/metalab/models",
        "model": {"name": "conv4", "hidden": 8},
        "options": {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 2},
    },
    # starts from the pretrain stage's body (same network as `pretrain.model`)
    "protonets": {"algorithm": "protonets", "body_init": "models/pretrain", "model": {"hidden": 4}},
}
# one extra training seed (stages train_seed@maml-s1, evaluate_seed@maml-s1)
SEED_RUNS = {"maml-s1": {"experiment": "maml", "seed": 1, "body_init": "src/metalab/models"}}
# report depends on metrics/train_rl and metrics/eval_rl, which only the RL stages create:
# with `rl_experiments: {}` `dvc repro` fails at report (reported), so one tiny RL run.
RL_EXPERIMENTS = {
    "nav": {
        "algorithm": "maml_rl",
        "env": "navigation_2d",
        "iterations": 2,
        "meta_batch_size": 2,
        "trajectories_per_task": 2,
        "horizon": 5,
        "hidden_size": 4,
        "hidden_layers": 1,
        "eval_tasks": 2,
        "eval_adaptation_steps": [1],
        "num_threads": 1,
    }
}
RL_SEEDS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train_rl"]["matrix"]["seed"]
PIPELINE_STAGES = {
    "download",
    "prefetch",
    "episodes",
    "pretrain",
    *(f"{stage}@{name}" for stage in ("train", "evaluate") for name in EXPERIMENTS),
    *(
        f"{stage}@{name}-{seed}"
        for stage in ("train_rl", "evaluate_rl")
        for name in RL_EXPERIMENTS
        for seed in RL_SEEDS
    ),
    *(f"{stage}@{name}" for stage in ("train_seed", "evaluate_seed") for name in SEED_RUNS),
    "report",
}


def pipeline_params(archive_dir: Path) -> dict:
    """Every stage at its smallest: two experiments of two iterations, one episode set of
    a few tasks, one pretraining epoch of a tiny body, one tiny RL run, no MLflow."""
    params = tiny_params(archive_dir)
    params["episodes"].update(settings=["5w1s"], num_episodes=4, query_per_class=2)
    params["pretrain"].update(model={"name": "conv4", "hidden": 4}, epochs=1, batch_size=100)
    params["train"].update(
        n_way=5,
        k_shot=1,
        query_per_class=2,
        meta_batch_size=2,
        iterations=2,
        validate_every=1,
        validation_episodes=2,
        checkpoint_every=2,
        log_every=1,
    )
    params["experiments"] = EXPERIMENTS
    params["seed_runs"] = SEED_RUNS
    params["rl_experiments"] = RL_EXPERIMENTS
    params["evaluate"].update(settings=None, adaptation_steps=None, max_episodes=None)
    params["evaluate"]["step_selection"] = {"steps": [1, 2], "episodes": 2, "seed": 0}
    params["report"].update(sort_by="5w1s", pairs=[["maml", "protonets"]])
    params["tracking"].update(enabled=False)
    return params


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if "Running stage '" in line}


def test_full_pipeline_repro_then_nothing_to_do(repo, tiny_omniglot_dir):
    (repo / "params.yaml").write_text(
        yaml.safe_dump(pipeline_params(Path(tiny_omniglot_dir)), sort_keys=False)
    )
    started = time.perf_counter()
    first = dvc(repo, "repro")
    seconds = time.perf_counter() - started
    assert stages_run(first) == PIPELINE_STAGES, first

    assert (repo / "models" / "pretrain" / "body.pt").is_file()
    for name, experiment in EXPERIMENTS.items():
        assert (repo / "models" / f"{name}.pt").is_file()
        trained = TrainSummary.read(repo / "metrics" / "train" / f"{name}.json").to_dict()
        assert trained["experiment"] == name and trained["iterations"] == 2
        assert trained["algorithm"] == experiment["algorithm"]
        evaluated = json.loads((repo / "metrics" / "eval" / f"{name}.json").read_text())
        assert list(evaluated["settings"]) == ["5w1s"]
        assert evaluated["settings"]["5w1s"]["episodes"] == 4
        assert 0 <= evaluated["settings"]["5w1s"]["accuracy"] <= 1
    # What the metrics say about adaptation is what the learner was configured with.
    maml_steps = json.loads((repo / "metrics" / "eval" / "maml.json").read_text())
    assert maml_steps["settings"]["5w1s"]["adaptation_steps"] == 2
    for name in RL_EXPERIMENTS:
        for seed in RL_SEEDS:
            assert (repo / "models" / "rl" / f"{name}-s{seed}.pt").is_file()
            assert (repo / "metrics" / "eval_rl" / f"{name}-s{seed}.json").is_file()
    report = (repo / "reports" / "comparison.md").read_text()
    assert all(name in report for name in EXPERIMENTS), report
    # The extra seed: its own files, recorded as a run of maml, aggregated into maml's row.
    seeded = TrainSummary.read(repo / "metrics" / "train" / "maml-s1.json")
    assert (seeded.experiment, seeded.seed) == ("maml", 1)
    assert (repo / "models" / "maml-s1.pt").is_file()
    table = pd.read_csv(repo / "reports" / "comparison.csv").set_index("experiment")
    assert "maml-s1" not in table.index and table.loc["maml", "5w1s_seeds"] == 2
    # Every file DVC shows as a metric holds numbers only; the text is in the info files.
    [workspace] = json.loads(dvc(repo, "metrics", "show", "--json")).values()  # one revision
    shown = workspace["data"]
    runs = len(EXPERIMENTS) + len(RL_EXPERIMENTS) * len(RL_SEEDS) + len(SEED_RUNS)
    # data, prefetch, episodes and pretrain, then a train and an evaluate file per run
    assert len(shown) == 4 + 2 * runs, sorted(shown)
    for path, content in shown.items():
        assert "error" not in content and numbers_only(content["data"]), (path, content)
        assert info_path(repo / path).is_file() == (path != "metrics/prefetch.json")
    # The stored evaluation episodes use only evaluation-alphabet characters (lake split).
    with np.load(repo / "data" / "prefetched" / "omniglot.npz") as prefetched:
        origin = prefetched["character_origin"]
    with np.load(repo / "data" / "episodes" / "5w1s.npz") as episodes:
        assert (origin[episodes["character"]] == 1).all()

    second = dvc(repo, "repro")
    assert stages_run(second) == set(), second
    assert "Data and pipelines are up to date" in second

    # Another pretrained body retrains only the experiment that starts from it.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["seed"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(repo, "repro")
    assert stages_run(third) == {"pretrain", "train@protonets", "evaluate@protonets", "report"}, (
        third
    )
    # Another seed for maml runs that seed's stages and the report, nothing else.
    params["seed_runs"]["maml-s2"] = {**SEED_RUNS["maml-s1"], "seed": 2}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc(repo, "repro")
    assert stages_run(fourth) == {"train_seed@maml-s2", "evaluate_seed@maml-s2", "report"}, fourth
    print(f"full pipeline: first dvc repro {seconds:.1f} s")
