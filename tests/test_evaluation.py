"""Held-out evaluation: interval formulas by hand, per-episode scores against a direct
loop, before/after adaptation, unsupported settings and the evaluate stage's files."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_learner_api import trainer_like_payload

from metalab import evaluation
from metalab.algorithms import maml
from metalab.algorithms.base import BuildContext, MetaLearner
from metalab.algorithms.registry import ALGORITHMS, build_learner, options_class
from metalab.data.config import EpisodesConfig, SplitConfig
from metalab.data.episodes import materialize, save_episode_set, write_evaluation_episodes
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.evaluation import (
    EPISODE_COLUMNS,
    evaluate_accuracy,
    evaluate_learner,
    load_episode_sets,
)
from metalab.io import save_torch
from metalab.learner_api import Learner, learner_from_payload
from metalab.models.config import ModelConfig
from metalab.params import ParamsError, validate_params
from metalab.records import EvaluationMetrics, info_path
from metalab.schema import TrackingConfig
from metalab.statistics import mean_ci95, paired_difference

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["5w1s", "3w2s"]
EPISODES = 6


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: tiny convolutions are far slower when several busy processes
    share the cores and torch spins up a thread pool in each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- statistics
def test_mean_ci95_by_hand():
    # mean 0.5; sample variance (0.09 + 0.01 + 0.01 + 0.09) / 3; half-width 1.96 s / 2
    mean, ci95 = mean_ci95(np.array([0.2, 0.4, 0.6, 0.8]))
    assert mean == pytest.approx(0.5)
    assert ci95 == pytest.approx(1.96 * math.sqrt(0.2 / 3) / 2)
    assert ci95 == pytest.approx(0.2530349, abs=1e-7)
    assert mean_ci95(np.array([0.7, 0.7, 0.7])) == pytest.approx((0.7, 0.0))
    one = mean_ci95(np.array([0.3]))
    assert one[0] == 0.3 and math.isnan(one[1])
    assert all(math.isnan(x) for x in mean_ci95(np.array([])))


def test_paired_difference_by_hand():
    # differences 0.5, 0.2, -0.1: mean 0.2, sample std 0.3, half-width 1.96 * 0.3 / sqrt(3)
    paired = paired_difference(np.array([1.0, 0.8, 0.6]), np.array([0.5, 0.6, 0.7]))
    assert paired.mean == pytest.approx(0.2)
    assert paired.ci95 == pytest.approx(1.96 * 0.3 / math.sqrt(3))
    assert paired.episodes == 3
    assert not paired.significant  # 0.2 < 0.3395
    # Pairing removes the shared per-episode difficulty: b = a - 0.1 +- tiny noise.
    a = np.array([0.2, 0.9, 0.5, 0.7])
    b = a - np.array([0.10, 0.12, 0.08, 0.10])
    paired = paired_difference(a, b)
    assert paired.mean == pytest.approx(0.1)
    assert paired.significant
    assert paired.ci95 < mean_ci95(a)[1] / 10
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        paired_difference(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def omniglot(tiny_prefetched_28):
    arrays = load_prefetched(tiny_prefetched_28)
    split = make_split(arrays.character_origin, SplitConfig(validation_characters=5))
    return arrays, split


@pytest.fixture(scope="module")
def episode_dir(omniglot, tmp_path_factory):
    arrays, split = omniglot
    directory = tmp_path_factory.mktemp("episodes")
    config = EpisodesConfig(settings=SETTINGS, num_episodes=EPISODES, query_per_class=3, seed=5)
    write_evaluation_episodes(directory, split, arrays.drawings_per_character, config)
    return directory


def make_learner(algorithm: str, options: dict | None = None):
    payload, _ = trainer_like_payload(algorithm, options)
    return learner_from_payload(payload)


def test_protonets_scores_match_a_direct_loop_and_have_no_before(
    omniglot, episode_dir, monkeypatch
):
    arrays, _ = omniglot
    monkeypatch.setattr(evaluation, "TASK_CHUNK", 4)  # 6 tasks: crosses a chunk boundary
    learner = make_learner("protonets")
    sets = load_episode_sets(SETTINGS, episode_dir)

    result = evaluate_learner(learner, arrays.images, sets, progress=False)

    for setting in SETTINGS:
        direct = evaluate_accuracy(learner.meta_learner, materialize(arrays.images, sets[setting]))
        scored = result.settings[setting]
        np.testing.assert_allclose(scored.accuracy_after, direct.numpy(), atol=1e-7)
        assert scored.accuracy_before is None
    metrics = result.metrics(peak_memory_mb=12.5)
    summary = metrics["settings"]["5w1s"]
    mean, ci95 = mean_ci95(result.settings["5w1s"].accuracy_after)
    assert summary["accuracy"] == pytest.approx(mean)
    assert summary["ci95"] == pytest.approx(ci95)
    assert summary["episodes"] == EPISODES and summary["n_way"] == 5 and summary["k_shot"] == 1
    assert summary["accuracy_before"] is None and summary["gain"] is None
    assert summary["adaptation_steps"] is None
    assert metrics["episodes"] == 2 * EPISODES and metrics["peak_memory_mb"] == 12.5
    assert metrics["unsupported"] == {}
    json.dumps(metrics, allow_nan=False)  # strictly valid JSON
    table = result.episode_table()
    assert list(table.columns) == EPISODE_COLUMNS
    assert len(table) == 2 * EPISODES
    assert table["accuracy_before"].isna().all()
    assert (table["seconds"] > 0).all()


def test_gradient_learner_gets_before_and_after_and_is_deterministic(omniglot, episode_dir):
    arrays, _ = omniglot
    sets = {"3w2s": load_episode_sets(["3w2s"], episode_dir)["3w2s"][:3]}
    learner = make_learner("maml", {"test_inner_steps": 2, "inner_lr": 0.4})
    assert learner.adapts_by_gradient

    first = evaluate_learner(learner, arrays.images, sets, seed=3, progress=False)
    second = evaluate_learner(learner, arrays.images, sets, seed=3, progress=False)

    scored = first.settings["3w2s"]
    np.testing.assert_array_equal(scored.accuracy_after, second.settings["3w2s"].accuracy_after)
    episodes = materialize(arrays.images, sets["3w2s"])
    unadapted = evaluate_accuracy(learner.meta_learner, episodes, steps=0).numpy()
    np.testing.assert_allclose(scored.accuracy_before, unadapted, atol=1e-7)
    summary = first.metrics()["settings"]["3w2s"]
    assert summary["adaptation_steps"] == 2
    assert summary["gain"] == pytest.approx(scored.accuracy_after.mean() - unadapted.mean())
    differences = scored.accuracy_after - unadapted
    assert summary["gain_ci95"] == pytest.approx(mean_ci95(differences)[1], nan_ok=True)
    table = first.episode_table()
    np.testing.assert_allclose(table["accuracy_before"], unadapted, atol=1e-7)


def test_setting_the_learner_cannot_do_is_reported_not_fatal(omniglot, tmp_path):
    arrays, split = omniglot
    config = EpisodesConfig(settings=["7w1s"], num_episodes=2, query_per_class=2, seed=1)
    write_evaluation_episodes(tmp_path, split, arrays.drawings_per_character, config)
    learner = make_learner("cavia", {"test_inner_steps": 1})  # trained 5-way

    result = evaluate_learner(
        learner, arrays.images, load_episode_sets(["7w1s"], tmp_path), progress=False
    )

    metrics = result.metrics()
    assert metrics["settings"] == {}
    assert "cannot handle a 7-way task" in metrics["unsupported"]["7w1s"]
    assert result.episode_table().empty


def test_image_size_mismatch_and_wrong_episode_file_are_clear_errors(
    omniglot, episode_dir, tmp_path
):
    arrays, _ = omniglot
    learner = make_learner("protonets")
    sets = load_episode_sets(["5w1s"], episode_dir)
    with pytest.raises(ValueError, match="trained on 28px images but the prefetched images"):
        evaluate_learner(learner, torch.zeros(10, 32, 32, dtype=torch.uint8), sets)
    shutil.copy(episode_dir / "3w2s.npz", tmp_path / "5w1s.npz")
    with pytest.raises(ValueError, match="holds 3-way 2-shot tasks"):
        load_episode_sets(["5w1s"], tmp_path)
    index = sets["5w1s"]
    save_episode_set(tmp_path / "4w1s.npz", index, setting="5w1s")
    with pytest.raises(ValueError, match="rerun `dvc repro episodes`"):
        load_episode_sets(["4w1s"], tmp_path)


def test_evaluation_settings_default_to_all_and_must_exist():
    params = validate_params({"episodes": {"settings": ["5w1s", "20w5s"]}})
    assert params.evaluation_settings() == ["5w1s", "20w5s"]
    params = validate_params(
        {"episodes": {"settings": ["5w1s", "20w5s"]}, "evaluate": {"settings": ["20w5s"]}}
    )
    assert params.evaluation_settings() == ["20w5s"]
    # a setting without an episode set is stopped at load
    with pytest.raises(ParamsError, match=r"evaluate\.settings = \[1w1s\]: 1w1s not in episodes"):
        validate_params({"episodes": {"settings": ["5w1s"]}, "evaluate": {"settings": ["1w1s"]}})


# ------------------------------------------------------------------------------ stage
def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_project(
    root: Path,
    episode_dir: Path,
    prefetched: Path,
    train_run: str | None,
    algorithm: str = "protonets",
    options: dict | None = None,
) -> dict:
    """A project directory as the evaluate stage sees it; returns its raw params."""
    (root / "data" / "prefetched").mkdir(parents=True)
    shutil.copy(prefetched, root / "data" / "prefetched" / "omniglot.npz")
    shutil.copytree(episode_dir, root / "data" / "episodes")
    payload, _ = trainer_like_payload(algorithm, options)
    save_torch(root / "models" / "tiny.pt", payload)
    (root / "metrics" / "train").mkdir(parents=True)
    (root / "metrics" / "train" / "tiny.json").write_text("{}")
    (root / "metrics" / "train" / "tiny.info.json").write_text(
        json.dumps({"mlflow_run_id": train_run})
    )
    experiment = {"algorithm": algorithm, "body_init": "src/metalab/models", "model": {"hidden": 8}}
    if options is not None:
        experiment["options"] = options
    raw = {
        "episodes": {"settings": SETTINGS, "num_episodes": EPISODES, "query_per_class": 3},
        "experiments": {"tiny": experiment},
        "evaluate": {"settings": ["3w2s"]},
        "train": {"threads": 1},
        "tracking": {"enabled": False, "experiment_name": "unit"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return raw


def test_evaluate_stage_writes_metrics_and_episodes(
    omniglot, episode_dir, tiny_prefetched_28, tmp_path, monkeypatch
):
    project = tmp_path / "project"
    raw = make_project(project, episode_dir, tiny_prefetched_28, train_run="abc")
    monkeypatch.chdir(project)
    stage = load_stage("evaluate")

    stage.main(argparse.Namespace(experiment="tiny", no_progress=True), validate_params(raw))

    path = project / "metrics" / "eval" / "tiny.json"
    metrics = EvaluationMetrics.read(path).to_dict()  # the numbers and the text beside them
    assert not {"experiment", "train_run_id", "unsupported"} & set(json.loads(path.read_text()))
    assert json.loads(info_path(path).read_text())["settings"] == {"3w2s": {"episode_set": ANY}}
    assert list(metrics["settings"]) == ["3w2s"]
    assert metrics["experiment"] == "tiny" and metrics["algorithm"] == "protonets"
    assert metrics["train_run_id"] == "abc" and metrics["mlflow_run_id"] is None
    assert metrics["peak_memory_mb"] > 10
    episodes = pd.read_csv(project / "metrics" / "eval" / "tiny.episodes.csv")
    assert len(episodes) == EPISODES and set(episodes["setting"]) == {"3w2s"}
    assert metrics["settings"]["3w2s"]["accuracy"] == pytest.approx(
        episodes["accuracy_after"].mean()
    )


@pytest.mark.slow
def test_evaluate_stage_run_is_linked_to_its_train_run(
    episode_dir, tiny_prefetched_28, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from metalab.tracking import stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Artifacts would otherwise go to ./mlruns of whatever the working directory is.
    MlflowClient(uri).create_experiment("unit", (tmp_path / "artifacts").as_uri())
    with stage_run(
        "train@tiny", {}, TrackingConfig(experiment_name="unit"), tags={"experiment": "tiny"}
    ) as train:
        pass
    project = tmp_path / "project"
    raw = make_project(project, episode_dir, tiny_prefetched_28, train_run=train.run_id)
    raw["tracking"]["enabled"] = True
    monkeypatch.chdir(project)

    load_stage("evaluate").main(
        argparse.Namespace(experiment="tiny", no_progress=True), validate_params(raw)
    )

    metrics = EvaluationMetrics.read(project / "metrics" / "eval" / "tiny.json").to_dict()
    run = MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert run.data.tags["train_run_id"] == train.run_id
    assert run.data.tags["mlflow.parentRunId"] == train.run_id
    assert run.data.tags["experiment"] == "tiny" and run.data.tags["dvc_stage"] == "evaluate@tiny"
    assert run.data.metrics["settings.3w2s.accuracy"] == pytest.approx(
        metrics["settings"]["3w2s"]["accuracy"]
    )
    artifacts = [item.path for item in MlflowClient(uri).list_artifacts(run.info.run_id)]
    assert artifacts == ["tiny.episodes.csv"]
    assert (tmp_path / "artifacts" / run.info.run_id / "artifacts" / "tiny.episodes.csv").is_file()


def test_max_episodes_keeps_the_first_tasks_of_every_set(episode_dir):
    full = load_episode_sets(SETTINGS, episode_dir)
    limited = load_episode_sets(SETTINGS, episode_dir, max_episodes=2)
    for setting in SETTINGS:
        assert limited[setting].num_tasks == 2
        torch.testing.assert_close(limited[setting].image_index, full[setting].image_index[:2])
    with pytest.raises(ParamsError, match="evaluate.max_episodes"):
        validate_params({"evaluate": {"max_episodes": 1}})


# ------------------------------------------------------------- adaptation steps used
# Evaluation must run exactly the adaptation steps it writes as `adaptation_steps`: the
# learner's declared default when evaluate.adaptation_steps is null, else that number.
# Options whose training inner steps differ from the test-time default, so that running
# the training count at test time is visible (LEO's default is its training count).
STEP_OPTIONS = {
    "maml": {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3},
    "taml": {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3},
    "anil_task_encoder": {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3},
    "reptile": {"inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": 3},
    "cavia": {"inner_lr": 10.0, "inner_steps": 1, "test_inner_steps": 3},
    "leo": {"inner_steps": 2, "finetune_steps": 1},
}
STEP_CASES = {algorithm: (algorithm, STEP_OPTIONS.get(algorithm, {})) for algorithm in ALGORITHMS}


class StepRecorder(MetaLearner):
    """A gradient learner that records the number of steps each `adapt` really runs."""

    algorithm = "step_recorder"
    adapts_by_gradient = True

    def __init__(self, default_steps: int) -> None:
        super().__init__()
        self.model = torch.nn.Linear(1, 1)
        self.default_steps = default_steps
        self.steps_run: list[int] = []

    @property
    def default_adaptation_steps(self) -> int:
        return self.default_steps

    def adapt(self, support_x, support_y, steps=None):
        self.steps_run.append(self.default_steps if steps is None else steps)
        n_way = int(support_y.max()) + 1
        return lambda query_x: torch.zeros(query_x.shape[0], n_way)


@pytest.mark.parametrize("explicit_steps", [None, 0, 2, 7])
def test_evaluation_records_the_steps_the_learner_ran(omniglot, episode_dir, explicit_steps):
    arrays, _ = omniglot
    recorder = StepRecorder(default_steps=4)
    learner = Learner(recorder, None, n_way=5, image_size=arrays.image_size)
    sets = load_episode_sets(SETTINGS, episode_dir, max_episodes=3)

    result = evaluate_learner(learner, arrays.images, sets, steps=explicit_steps, progress=False)

    expected = 4 if explicit_steps is None else explicit_steps
    for setting in SETTINGS:
        assert result.metrics()["settings"][setting]["adaptation_steps"] == expected
    # Per task: the scored adaptation, then the "before" one (0 steps).
    assert recorder.steps_run == [expected, 0] * (3 * len(SETTINGS))


def count_maml_inner_steps(monkeypatch) -> list[int]:
    """Record the `steps` of every inner loop the MAML core runs."""
    steps_run: list[int] = []
    real = maml.inner_loop

    def recording(params, adapted_names, support_loss, inner_lr, steps, second_order):
        steps_run.append(steps)
        return real(params, adapted_names, support_loss, inner_lr, steps, second_order)

    monkeypatch.setattr(maml, "inner_loop", recording)
    return steps_run


@pytest.mark.parametrize("explicit_steps", [None, 2])
def test_maml_evaluation_runs_the_recorded_test_time_steps(
    omniglot, episode_dir, monkeypatch, explicit_steps
):
    """MAML trained with 1 inner step, tested with 3: evaluation runs 3 (or the explicit
    count), never the training count, and writes what it ran."""
    arrays, _ = omniglot
    learner = make_learner("maml", STEP_OPTIONS["maml"])
    assert learner.default_adaptation_steps == 3
    sets = {"3w2s": load_episode_sets(["3w2s"], episode_dir, max_episodes=2)["3w2s"]}
    steps_run = count_maml_inner_steps(monkeypatch)

    result = evaluate_learner(learner, arrays.images, sets, steps=explicit_steps, progress=False)

    recorded = result.metrics()["settings"]["3w2s"]["adaptation_steps"]
    assert recorded == (3 if explicit_steps is None else explicit_steps)
    # The two episodes are adapted together (one chunk of `task_chunk_size` 2), in one
    # inner loop whose start is also "before adaptation" (`adapt_before_after`).
    assert steps_run == [recorded]


@pytest.mark.parametrize("adaptation_steps", [None, 2])
def test_evaluate_stage_runs_the_adaptation_steps_it_writes(
    episode_dir, tiny_prefetched_28, tmp_path, monkeypatch, adaptation_steps
):
    project = tmp_path / "project"
    raw = make_project(project, episode_dir, tiny_prefetched_28, None, "maml", STEP_OPTIONS["maml"])
    raw["evaluate"].update(adaptation_steps=adaptation_steps, max_episodes=2)
    monkeypatch.chdir(project)
    steps_run = count_maml_inner_steps(monkeypatch)

    load_stage("evaluate").main(
        argparse.Namespace(experiment="tiny", no_progress=True), validate_params(raw)
    )

    metrics = json.loads((project / "metrics" / "eval" / "tiny.json").read_text())
    written = metrics["settings"]["3w2s"]["adaptation_steps"]
    assert written == (3 if adaptation_steps is None else adaptation_steps)
    assert steps_run == [written]  # both episodes at once, "before" from the same loop


def tiny_task(n_way: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    support_x = torch.rand(n_way, 1, 28, 28, generator=generator)
    support_y = torch.arange(n_way)
    query_x = torch.rand(2 * n_way, 1, 28, 28, generator=generator)
    return support_x, support_y, query_x


@pytest.mark.parametrize("case", STEP_CASES)
def test_default_adaptation_is_the_declared_default_steps(case):
    """`adapt` without steps behaves exactly as with `default_adaptation_steps` (what the
    metrics record), and the step count matters (else the equality would prove nothing).
    Learners that do not adapt by gradient declare no default and ignore steps."""
    algorithm, options = STEP_CASES[case]
    validated = options_class(algorithm).model_validate(options)
    context = BuildContext(model=ModelConfig(hidden=8), n_way=5, image_size=28)
    torch.manual_seed(0)
    learner = build_learner(algorithm, validated, context).eval()
    support_x, support_y, query_x = tiny_task()

    def logits(steps):
        torch.manual_seed(1)  # learners that draw (e.g. minibatches) draw the same
        return learner.adapt(support_x, support_y, steps)(query_x).detach()

    default = learner.default_adaptation_steps
    if not learner.adapts_by_gradient:
        assert default is None
        torch.testing.assert_close(logits(None), logits(3), rtol=0, atol=0)
        return
    assert isinstance(default, int) and default >= 1
    torch.testing.assert_close(logits(None), logits(default), rtol=0, atol=0)
    assert not torch.equal(logits(None), logits(default - 1))
    assert not torch.equal(logits(None), logits(default + 1))
