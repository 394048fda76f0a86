"""evaluate.step_selection: a gradient learner's test-time steps chosen per setting on
validation tasks (validation characters only), kept on its training setting, recorded with
the setting's result and reproducible; off, evaluation is as before."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from test_evaluation import (
    SETTINGS,
    STEP_OPTIONS,
    load_stage,
    make_learner,
    make_project,
)

from metalab import evaluation
from metalab.algorithms.base import MetaLearner
from metalab.data.config import EpisodesConfig, SplitConfig
from metalab.data.episodes import EpisodeIndex, write_evaluation_episodes
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.evaluation import (
    StepSelection,
    choose_steps,
    evaluate_learner,
    load_episode_sets,
    select_adaptation_steps,
    validation_episode_sets,
)
from metalab.learner_api import Learner
from metalab.params import ParamsError, validate_params
from metalab.records import EvaluationMetrics, info_path

CANDIDATES = (1, 2, 3, 5, 10)
PEAK = 5
VALIDATION_EPISODES = 4
QUERIES = 3


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def omniglot(tiny_prefetched_28):
    arrays = load_prefetched(tiny_prefetched_28)
    split = make_split(arrays.character_origin, SplitConfig(validation_characters=5))
    return arrays, split


@pytest.fixture(scope="module")
def stored_dir(omniglot, tmp_path_factory) -> Path:
    """Stored meta-test sets of `SETTINGS` (5w1s: the tiny models' trained setting; 3w2s:
    another), as the episodes stage writes them."""
    arrays, split = omniglot
    directory = tmp_path_factory.mktemp("episodes")
    config = EpisodesConfig(settings=SETTINGS, num_episodes=4, query_per_class=QUERIES, seed=5)
    write_evaluation_episodes(directory, split, arrays.drawings_per_character, config)
    return directory


@pytest.fixture(scope="module")
def stored_sets(stored_dir) -> dict[str, EpisodeIndex]:
    return load_episode_sets(SETTINGS, stored_dir)


def selection(omniglot, stored_sets, candidates=CANDIDATES, seed: int = 0) -> StepSelection:
    arrays, split = omniglot
    sets = validation_episode_sets(
        split.validation, arrays.drawings_per_character, stored_sets, VALIDATION_EPISODES, seed
    )
    return StepSelection(sets, tuple(candidates), seed)


def characters(split_part: torch.Tensor) -> set[int]:
    return set(split_part[:, 0].tolist())


# --------------------------------------------------------------- a known best step count
class PeakLearner(MetaLearner):
    """A gradient learner whose accuracy peaks at `peak` steps: it classifies queries by the
    nearest support image, except that with `steps` != `peak` it answers another class for
    the first |steps - peak| queries (so accuracy falls with the distance to the peak; with
    ``flat`` every count scores the same)."""

    algorithm = "peak"
    adapts_by_gradient = True

    def __init__(self, peak: int, flat: bool = False) -> None:
        super().__init__()
        self.model = torch.nn.Linear(1, 1)
        self.peak, self.flat = peak, flat
        self.steps_run: list[int] = []

    @property
    def default_adaptation_steps(self) -> int:
        return 3

    def adapt(self, support_x, support_y, steps=None):
        steps = self.default_adaptation_steps if steps is None else steps
        self.steps_run.append(steps)
        n_way = int(support_y.max()) + 1
        spoiled = 0 if self.flat else abs(steps - self.peak)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            distances = torch.cdist(query_x.flatten(1), support_x.flatten(1))
            nearest = support_y[distances.argmin(dim=1)]
            nearest[:spoiled] = (nearest[:spoiled] + 1) % n_way  # a wrong class
            return torch.nn.functional.one_hot(nearest, n_way).float()

        return predict


def peak_learner(omniglot, **kwargs) -> Learner:
    arrays, _ = omniglot
    return Learner(
        PeakLearner(PEAK, **kwargs), None, n_way=5, image_size=arrays.image_size, k_shot=1
    )


def test_the_step_count_with_the_best_validation_accuracy_is_chosen(omniglot, stored_sets):
    arrays, _ = omniglot
    plan = selection(omniglot, stored_sets)

    choice = select_adaptation_steps(
        peak_learner(omniglot), arrays.images, plan.validation_sets["3w2s"], "3w2s", CANDIDATES
    )

    assert choice.steps == PEAK and not choice.trained_setting
    assert list(choice.accuracies) == list(CANDIDATES)
    assert max(choice.accuracies.values()) == choice.accuracies[PEAK]
    # further from the peak, more queries spoiled: strictly worse on both sides
    assert (
        choice.accuracies[3] < choice.accuracies[PEAK]
        and choice.accuracies[10] < (choice.accuracies[PEAK])
    )
    assert choice.episodes == VALIDATION_EPISODES


def test_ties_go_to_the_fewest_steps(omniglot, stored_sets):
    arrays, _ = omniglot
    plan = selection(omniglot, stored_sets)

    choice = select_adaptation_steps(
        peak_learner(omniglot, flat=True),
        arrays.images,
        plan.validation_sets["3w2s"],
        "3w2s",
        (5, 2, 10),
    )

    assert len(set(choice.accuracies.values())) == 1 and choice.steps == 2


def test_the_test_set_is_scored_with_the_chosen_steps_and_the_trained_setting_keeps_its_own(
    omniglot, stored_sets
):
    arrays, _ = omniglot
    learner = peak_learner(omniglot)

    result = evaluate_learner(
        learner,
        arrays.images,
        stored_sets,
        progress=False,
        step_selection=selection(omniglot, stored_sets),
    )

    settings = result.metrics()["settings"]
    assert settings["3w2s"]["adaptation_steps"] == PEAK
    assert settings["3w2s"]["step_selection"]["trained_setting"] is False
    assert list(settings["3w2s"]["step_selection"]["validation_accuracy"]) == [
        "1",
        "2",
        "3",
        "5",
        "10",
    ]
    assert settings["5w1s"]["adaptation_steps"] == 3  # the trained default, not PEAK
    assert settings["5w1s"]["step_selection"] == {
        "trained_setting": True,
        "episodes": 0,
        "validation_accuracy": {},
    }
    # 5w1s: its test tasks (after, then before); 3w2s: every candidate on the validation
    # tasks, then its test tasks with the choice
    tests = len(stored_sets["5w1s"].image_index)
    # (scored as test tasks are: each adaptation, then before it, 0 steps)
    validation = [n for s in CANDIDATES for _ in range(VALIDATION_EPISODES) for n in (s, 0)]
    expected = [3, 0] * tests + validation + [PEAK, 0] * len(stored_sets["3w2s"].image_index)
    assert learner.meta_learner.steps_run == expected


def test_the_learners_own_steps_are_always_a_candidate(omniglot, stored_sets):
    arrays, _ = omniglot
    learner = peak_learner(omniglot)  # default 3 steps
    plan = StepSelection(selection(omniglot, stored_sets).validation_sets, (10, 1), 0)

    choice = choose_steps(learner, arrays.images, stored_sets["3w2s"], "3w2s", plan)

    assert list(choice.accuracies) == [10, 1, 3]  # the grid's order, then its own
    assert choice.steps == 3  # the closest to the peak (5) of the three


# -------------------------------------------------- only validation characters are seen
def test_validation_tasks_hold_validation_characters_only(omniglot, stored_sets):
    _, split = omniglot
    plan = selection(omniglot, stored_sets)
    for setting, index in plan.validation_sets.items():
        used = set(index.character.flatten().tolist())
        assert used <= characters(split.validation), setting
        assert not used & characters(split.meta_test)
        assert (index.n_way, index.k_shot) == {"5w1s": (5, 1), "3w2s": (3, 2)}[setting]


def test_the_selection_materialises_no_test_character(omniglot, stored_sets, monkeypatch):
    arrays, split = omniglot
    seen: list[set[int]] = []
    real = evaluation.materialize

    def recording(images, index):
        seen.append(set(index.character.flatten().tolist()))
        return real(images, index)

    monkeypatch.setattr(evaluation, "materialize", recording)
    learner = make_learner("maml", STEP_OPTIONS["maml"])

    choice = choose_steps(
        learner, arrays.images, stored_sets["3w2s"], "3w2s", selection(omniglot, stored_sets)
    )

    assert choice is not None and not choice.trained_setting
    assert len(seen) == len(CANDIDATES)  # one chunk of validation tasks per candidate
    for used in seen:
        assert used <= characters(split.validation)
        assert not used & characters(split.meta_test)
        assert not used & characters(split.meta_train)


# ----------------------------------------------------------------- off, rerun, read back
def test_off_the_record_and_the_numbers_are_as_before(omniglot, stored_sets):
    arrays, _ = omniglot
    learner = make_learner("maml", STEP_OPTIONS["maml"])

    off = evaluate_learner(learner, arrays.images, stored_sets, progress=False)
    on = evaluate_learner(
        learner,
        arrays.images,
        stored_sets,
        progress=False,
        step_selection=selection(omniglot, stored_sets),
    )

    for result in off.metrics()["settings"].values():
        assert "step_selection" not in result and "step_selection_note" not in result
        assert result["adaptation_steps"] == 3
    # the trained setting (5w1s) keeps its steps: its test numbers are those without the
    # selection, although the selection ran on another setting in between
    trained_off, trained_on = off.settings["5w1s"], on.settings["5w1s"]
    assert (trained_off.accuracy_after == trained_on.accuracy_after).all()
    assert (trained_off.accuracy_before == trained_on.accuracy_before).all()
    # the selection does not move the RNG of the test tasks: with the same steps the
    # 3w2s numbers are those of a plain evaluation with that many steps
    chosen = on.settings["3w2s"].adaptation_steps
    fixed = evaluate_learner(
        learner, arrays.images, {"3w2s": stored_sets["3w2s"]}, steps=chosen, progress=False
    )
    assert (fixed.settings["3w2s"].accuracy_after == on.settings["3w2s"].accuracy_after).all()


def test_a_rerun_gives_the_same_choice_and_accuracies(omniglot, stored_sets):
    arrays, _ = omniglot
    # Task dropout draws masks at test time: the seeding must make them repeat too
    options = {**STEP_OPTIONS["maml"], "task_dropout_rates": [0.2, 0.2, 0.2, 0.2]}
    learner = make_learner("maml", options)

    first, second = (
        evaluate_learner(
            learner,
            arrays.images,
            stored_sets,
            progress=False,
            step_selection=selection(omniglot, stored_sets),
        ).metrics()
        for _ in range(2)
    )

    assert first["settings"]["3w2s"]["step_selection"]["validation_accuracy"]
    assert without_timing(first["settings"]) == without_timing(second["settings"])


def without_timing(settings: dict) -> dict:
    """Per-setting results without their seconds (the only field a rerun may change)."""
    return {
        setting: {k: v for k, v in result.items() if k != "seconds_per_episode"}
        for setting, result in settings.items()
    }


def test_the_recorded_choice_reads_back_numbers_in_the_metrics_file_note_beside_it(
    omniglot, stored_sets, tmp_path
):
    arrays, _ = omniglot
    learner = peak_learner(omniglot)
    record = evaluate_learner(
        learner,
        arrays.images,
        stored_sets,
        progress=False,
        step_selection=selection(omniglot, stored_sets),
    ).record()
    path = tmp_path / "eval.json"

    record.write(path)
    read = EvaluationMetrics.read(path)

    assert read == record
    result = read.settings["3w2s"]
    assert result.adaptation_steps == PEAK
    assert result.step_selection.validation_accuracy["5"] == max(
        result.step_selection.validation_accuracy.values()
    )
    numbers = json.loads(path.read_text())["settings"]["3w2s"]
    text = json.loads(info_path(path).read_text())["settings"]["3w2s"]
    assert set(numbers["step_selection"]) == {"trained_setting", "episodes", "validation_accuracy"}
    assert "step_selection_note" not in numbers and "step_selection" not in text
    assert text["step_selection_note"].startswith(f"{PEAK} steps: best mean accuracy")
    assert (
        "trained setting"
        in json.loads(info_path(path).read_text())["settings"]["5w1s"]["step_selection_note"]
    )


def test_learners_without_test_time_steps_get_no_choice(omniglot, stored_sets):
    arrays, _ = omniglot
    learner = make_learner("protonets")
    result = evaluate_learner(
        learner,
        arrays.images,
        stored_sets,
        progress=False,
        step_selection=selection(omniglot, stored_sets),
    )
    for summary in result.metrics()["settings"].values():
        assert "step_selection" not in summary and summary["adaptation_steps"] is None


# ------------------------------------------------------------------------- params, stage
def test_params_errors_name_the_key():
    full = {"steps": [1, 2], "episodes": 10, "seed": 0}
    with pytest.raises(ParamsError, match=r"evaluate\.adaptation_steps = 2: fixed steps"):
        validate_params({"evaluate": {"adaptation_steps": 2, "step_selection": full}})
    with pytest.raises(ParamsError, match=r"evaluate\.step_selection\.steps = \[1, 1\]: .*once"):
        validate_params({"evaluate": {"step_selection": {**full, "steps": [1, 1]}}})
    with pytest.raises(ParamsError, match=r"unknown key evaluate\.step_selection\.lr; allowed"):
        validate_params({"evaluate": {"step_selection": {**full, "lr": 1}}})
    # every value is spelled out in params.yaml (a DVC param), none taken from the code
    with pytest.raises(ParamsError, match=r"evaluate\.step_selection\.episodes"):
        validate_params({"evaluate": {"step_selection": {"steps": [1, 2], "seed": 0}}})
    with pytest.raises(ParamsError, match=r"20w1s validation tasks need 20 classes; .* has 10"):
        validate_params(
            {
                "data": {"split": {"validation_characters": 10}},
                "evaluate": {"step_selection": full},
            }
        )
    chosen = validate_params({"evaluate": {"step_selection": full}}).evaluate.step_selection
    assert (chosen.steps, chosen.episodes, chosen.seed) == ([1, 2], 10, 0)
    assert validate_params({}).evaluate.step_selection is None  # off by default


def test_evaluate_stage_selects_on_validation_tasks_and_writes_the_choice(
    tiny_prefetched_28, tmp_path, monkeypatch, omniglot, stored_dir
):
    _, split = omniglot
    project = tmp_path / "project"
    raw = make_project(project, stored_dir, tiny_prefetched_28, None, "maml", STEP_OPTIONS["maml"])
    raw["episodes"]["query_per_class"] = QUERIES
    raw["data"] = {"split": {"validation_characters": 5}}
    raw["evaluate"] = {
        "settings": SETTINGS,
        "step_selection": {"steps": [0, 1, 3], "episodes": 3, "seed": 1},
    }
    monkeypatch.chdir(project)
    seen: list[set[int]] = []
    real = evaluation.materialize

    def recording(images, index):
        seen.append(set(index.character.flatten().tolist()))
        return real(images, index)

    monkeypatch.setattr(evaluation, "materialize", recording)
    stage = load_stage("evaluate")

    def run() -> tuple[str, str]:
        stage.main(argparse.Namespace(experiment="tiny", no_progress=True), validate_params(raw))
        path = project / "metrics" / "eval" / "tiny.json"
        return path.read_text(), info_path(path).read_text()

    numbers, text = run()

    settings = json.loads(numbers)["settings"]
    assert settings["5w1s"]["step_selection"]["trained_setting"] is True
    assert settings["5w1s"]["adaptation_steps"] == 3
    accuracies = settings["3w2s"]["step_selection"]["validation_accuracy"]
    assert list(accuracies) == ["0", "1", "3"]
    best = max(accuracies.values())
    assert settings["3w2s"]["adaptation_steps"] == min(
        int(s) for s, a in accuracies.items() if a == best
    )
    assert "validation episodes" in json.loads(text)["settings"]["3w2s"]["step_selection_note"]
    test_characters = characters(split.meta_test)
    validation_characters = characters(split.validation)
    # every task set materialised is all test or all validation characters: 5w1s test, the
    # three 3w2s candidates on validation tasks, then the 3w2s test tasks
    kinds = [
        "test"
        if used <= test_characters
        else "validation"
        if used <= validation_characters
        else "?"
        for used in seen
    ]
    assert kinds == ["test", "validation", "validation", "validation", "test"]
    rerun = json.loads(run()[0])["settings"]  # the same choice and accuracies
    assert without_timing(rerun) == without_timing(settings)


@pytest.mark.parametrize("only", [False, True])
def test_trained_setting_only_evaluates_a_model_on_its_own_setting(
    stored_dir, tiny_prefetched_28, tmp_path, monkeypatch, only
):
    # the tiny model file says 5-way 1-shot (test_learner_api.trainer_like_payload)
    project = tmp_path / "project"
    raw = make_project(project, stored_dir, tiny_prefetched_28, None)
    raw["evaluate"] = {"settings": SETTINGS, "trained_setting_only": only, "max_episodes": 2}
    monkeypatch.chdir(project)

    load_stage("evaluate").main(
        argparse.Namespace(experiment="tiny", no_progress=True), validate_params(raw)
    )

    metrics = json.loads((project / "metrics" / "eval" / "tiny.json").read_text())
    assert list(metrics["settings"]) == (["5w1s"] if only else SETTINGS)


def test_the_paper_file_trains_one_model_per_setting_evaluated_there():
    from metalab.data.config import parse_setting
    from metalab.params import load_params

    root = Path(__file__).resolve().parents[1]
    default = load_params(root / "params.yaml")
    paper = load_params(root / "params" / "paper.yaml")
    settings = paper.episodes.settings
    assert set(paper.experiments) == {f"{n}_{s}" for n in default.experiments for s in settings}
    assert paper.evaluate.trained_setting_only and paper.evaluate.step_selection is None
    maml_core = {"maml", "maml_bf16", "fomaml", "fomaml_zero_head", "maml_task_dropout"}
    maml_core |= {"maml_meta_dropout", "taml_entropy", "taml_theil"}
    for name in default.experiments:
        reference = f"{name}_5w1s"
        for setting in settings:
            run = f"{name}_{setting}"
            train, experiment = paper.train_config(run), paper.experiment(run)
            n_way, k_shot = parse_setting(setting)
            assert (train.n_way, train.k_shot) == (n_way, k_shot)
            # The runs of one experiment differ only in the setting (and, for the MAML
            # core at 20-way, in cbfinn/maml's 20-way configuration).
            changed = {"n_way", "k_shot"}
            options = paper.experiment(reference).options.model_dump()
            if n_way == 20 and name in maml_core:
                changed.add("meta_batch_size")
                assert train.meta_batch_size == 16
                options.update(inner_lr=0.1, inner_steps=5, test_inner_steps=5)
            if n_way == 20 and name == "reptile":  # openai/supervised-reptile's 20-way command
                changed.add("iterations")
                assert train.iterations == 200000
                options.update(
                    inner_lr=0.0005, inner_steps=10, inner_batch_size=20, test_inner_batch_size=10
                )
            assert experiment.options.model_dump() == options, run
            own = paper.train_config(reference).model_dump()
            assert {k: v for k, v in train.model_dump().items() if k not in changed} == {
                k: v for k, v in own.items() if k not in changed
            }, run
            assert (experiment.algorithm, experiment.model, experiment.body_init) == (
                paper.experiment(reference).algorithm,
                paper.experiment(reference).model,
                paper.experiment(reference).body_init,
            )
