"""params.yaml validation: bad input names the dotted key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from annotated_types import Ge, Gt, Le

from metalab.data.config import OMNIGLOT_DRAWINGS_PER_CHARACTER, load_data_params, parse_setting
from metalab.params import ParamsError, TrainConfig, load_params, validate_params
from metalab.rl.config import load_rl_params

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["5w1s", "5w5s", "20w1s", "20w5s"]


def test_repository_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.data.image_size in (28, 105)
    assert params.episodes.num_episodes >= 1


def test_paper_params_file_trains_every_experiment_once_per_setting_with_paper_budgets():
    default = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params" / "paper.yaml")
    settings = paper.episodes.settings
    assert set(paper.experiments) == {f"{n}_{s}" for n in default.experiments for s in settings}
    assert paper.evaluate.trained_setting_only
    assert paper.data.split.protocol == "vinyals"
    assert paper.evaluate.max_episodes is None
    maml = paper.train_config("maml_5w1s")
    assert (maml.meta_batch_size, maml.iterations) == (32, 60000)
    assert paper.experiment("maml_5w1s").options.inner_lr == 0.4
    assert paper.experiment("protonets_5w1s").options.train_n_way == 60
    for name in default.experiments:
        for setting in settings:
            budget = paper.train_config(f"{name}_{setting}").iterations
            assert budget > default.train_config(name).iterations


@pytest.mark.parametrize(
    ("path", "suffix"),
    [(ROOT / "params.yaml", ""), *((ROOT / "params" / "paper.yaml", f"_{s}") for s in SETTINGS)],
)
def test_maml_bf16_differs_from_maml_only_in_precision(path, suffix):
    # The report's [maml, maml_bf16] pair measures bf16's effect only if nothing else differs.
    params = load_params(path)
    maml, maml_bf16 = f"maml{suffix}", f"maml_bf16{suffix}"
    fp32, bf16 = params.experiment(maml), params.experiment(maml_bf16)
    assert (fp32.algorithm, fp32.model, fp32.body_init) == (
        bf16.algorithm,
        bf16.model,
        bf16.body_init,
    )
    assert params.experiment(maml).options == params.experiment(maml_bf16).options
    fp32_train, bf16_train = params.train_config(maml), params.train_config(maml_bf16)
    assert (fp32_train.precision, bf16_train.precision) == ("fp32", "bf16")
    assert fp32_train.model_copy(update={"precision": "bf16"}) == bf16_train
    assert [maml, maml_bf16] in [list(pair) for pair in params.report.pairs]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"train": {"meta_batch_size": -3}},
            "train.meta_batch_size = -3: Input should be greater than or equal to 1",
        ),
        ({"data": {"image_size": 64}}, "data.image_size = 64: Input should be 28 or 105"),
        (
            {"data": {"split": {"protocol": "random"}}},
            "data.split.protocol = random: Input should be 'lake' or 'vinyals'",
        ),
        (
            {"train": {"iterations": "many"}},
            "train.iterations = many: Input should be a valid integer",
        ),
        (
            {"episodes": {"settings": ["5w1x"]}},
            "episodes.settings = [5w1x]: '5w1x' is not of the form",
        ),
        (
            {"data": {"download_timeout": 0}},
            "data.download_timeout = 0: Input should be greater than 0",
        ),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, expected):
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    message = str(caught.value)
    assert message.startswith("params.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(
        ParamsError, match=r"unknown key train\.meta_batchsize; allowed keys: .*meta_batch_size"
    ):
        validate_params({"train": {"meta_batchsize": 4}})
    with pytest.raises(ParamsError, match=r"unknown key datas; allowed keys: data, episodes"):
        validate_params({"datas": {}})
    with pytest.raises(
        ParamsError, match=r"unknown key data\.split\.protcol; allowed keys: .*protocol"
    ):
        validate_params({"data": {"split": {"protcol": "lake"}}})


def test_unknown_algorithm_lists_allowed_algorithms():
    with pytest.raises(
        ParamsError, match=r"experiments\.x\.algorithm = mammal: unknown algorithm; allowed: .*maml"
    ):
        validate_params({"experiments": {"x": {"algorithm": "mammal"}}})


# The seed project's names of its own designs, which were papers' names: refused with the
# new name, each experiment's key and value in one line.
RENAMED = [
    (
        {"algorithm": "metanets"},
        "experiments.x.algorithm = metanets: renamed generated_head (the seed project's "
        "design; 'meta_networks' is Munkhdalai & Yu's)",
    ),
    (
        {"algorithm": "metanets_embedding", "options": {"similarity": "cosine"}},
        "experiments.x.algorithm = metanets_embedding: renamed film_prototypes (the seed "
        "project's 'embedding-based Meta Networks')",
    ),
    *[
        (
            {"algorithm": algorithm, "options": {"meta_dropout_rates": [0.1, 0.1, 0.1, 0.1]}},
            "experiments.x.options.meta_dropout_rates = [0.1, 0.1, 0.1, 0.1]: renamed "
            "task_dropout_rates (the seed project's 'Meta Dropout'; Lee et al.'s is "
            "learned_noise)",
        )
        for algorithm in ("maml", "taml", "protonets", "generated_head", "film_prototypes")
    ],
    (
        {"algorithm": "taml", "options": {"variant": "encoder", "inner_lr": 0.4}},
        "experiments.x.options.variant = encoder: now algorithm anil_task_encoder (the seed "
        "project's 'TAML', ANIL with a task encoder; not Jamal & Qi's)",
    ),
]


@pytest.mark.parametrize(("experiment", "message"), RENAMED)
def test_seed_names_are_refused_with_the_new_name(experiment, message):
    raw = {"experiments": {"x": {"body_init": "src/metalab/models", **experiment}}}
    assert one_line_error(raw) == f"params.yaml: {message}"


def test_renamed_names_are_accepted():
    params = validate_params(
        {
            "experiments": {
                "g": {"algorithm": "generated_head", "options": {"task_dropout_rates": [0.1]}},
                "f": {"algorithm": "film_prototypes"},
                "a": {"algorithm": "anil_task_encoder", "options": {"encoder_width": 8}},
                "t": {"algorithm": "taml", "options": {"variant": "inequality"}},
            }
        }
    )
    assert params.experiment("g").options.task_dropout_rates == [0.1]
    assert params.experiment("a").options.adapt_parameters == "head"


def test_stage_exits_2_naming_the_new_algorithm(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(
        yaml.safe_dump({"experiments": {"x": {"algorithm": "metanets", "body_init": RANDOM}}})
    )
    stage = (
        "from metalab.cli import run_stage, stage_parser\n"
        "from metalab.params import load_params\n"
        "run_stage(lambda args, params: print('main ran'), stage_parser(None), load_params)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", stage, "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: params.yaml: {RENAMED[0][1]}"]


def test_experiment_train_overrides_merge_over_defaults():
    params = validate_params(
        {
            "train": {"meta_lr": 0.01, "iterations": 7},
            "experiments": {"a": {"algorithm": "protonets", "train": {"iterations": 3}}},
        }
    )
    merged = params.train_config("a")
    assert (merged.iterations, merged.meta_lr) == (3, 0.01)
    with pytest.raises(ParamsError, match="no experiment named 'b'"):
        params.experiment("b")


def test_parse_setting():
    assert parse_setting("20w5s") == (20, 5)
    with pytest.raises(ValueError):
        parse_setting("1w1s")


def test_stage_exits_with_status_2_and_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"data": {"image_size": 32}}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prefetch.py"), "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: params.yaml: data.image_size = 32: Input should be 28 or 105"]


def test_invalid_yaml_is_reported_with_line(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("data:\n  image_size: [28\n")
    with pytest.raises(ParamsError, match="is not valid YAML"):
        load_params(broken)


# ------------------------------------------------- every bad value stops at load
def one_line_error(raw) -> str:
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    message = str(caught.value)
    assert message.startswith("params.yaml: ") and "\n" not in message
    return message


def with_override(key, value) -> dict:
    return {"experiments": {"x": {"algorithm": "maml", "train": {key: value}}}}


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("grad_clip_norm", -1, "Input should be greater than 0"),  # else gradient ascent
        ("iterations", 0, "Input should be greater than or equal to 1"),  # untrained model
        ("n_way", 1, "Input should be greater than or equal to 2"),  # accuracy 1.000
        ("validate_every", 0, "Input should be greater than or equal to 1"),  # ZeroDivision
        ("k_shot", 0, "Input should be greater than or equal to 1"),  # reshape error
        ("meta_batch_size", 0, "Input should be greater than or equal to 1"),
        ("meta_lr", -0.1, "Input should be greater than 0"),
    ],
)
def test_train_override_is_checked_like_train(key, value, reason):
    message = one_line_error(with_override(key, value))
    assert message == f"params.yaml: experiments.x.train.{key} = {value}: {reason}"
    assert (
        one_line_error({"train": {key: value}}) == f"params.yaml: train.{key} = {value}: {reason}"
    )


def violations(field) -> list:
    """Values just outside each bound of a TrainConfig field."""
    bad = []
    for bound in field.metadata:
        if isinstance(bound, Ge):
            bad.append(bound.ge - 1)
        elif isinstance(bound, Gt):
            bad.append(bound.gt)
        elif isinstance(bound, Le):
            bad.append(bound.le + 1)
    return bad


CONSTRAINED = [
    (name, value) for name, field in TrainConfig.model_fields.items() for value in violations(field)
]


def test_train_has_constrained_keys():
    assert len({name for name, _ in CONSTRAINED}) >= 12  # the helper found the bounds


@pytest.mark.parametrize(("key", "value"), CONSTRAINED)
def test_every_train_bound_applies_to_overrides(key, value):
    top = one_line_error({"train": {key: value}}).removeprefix("params.yaml: train.")
    override = one_line_error(with_override(key, value))
    assert override == f"params.yaml: experiments.x.train.{top}"


def test_override_literals_and_types_are_checked_too():
    message = one_line_error(with_override("optimizer", "adagrad"))
    assert (
        message
        == "params.yaml: experiments.x.train.optimizer = adagrad: Input should be 'adam' or 'sgd'"
    )
    assert "experiments.x.train.iterations = many" in one_line_error(
        with_override("iterations", "many")
    )


RANDOM = "src/metalab/models"
TWO = {
    "a": {"algorithm": "maml", "body_init": RANDOM},
    "b": {"algorithm": "protonets", "body_init": RANDOM},
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"episodes": {"settings": ["5w1s"]}, "evaluate": {"settings": ["5w1s", "20w5s"]}},
            "evaluate.settings = [5w1s, 20w5s]: 20w5s not in episodes.settings [5w1s]",
        ),
        (
            {"experiments": TWO, "report": {"pairs": [["a", "b"], ["a", "ghost"]]}},
            "report.pairs.1 = [a, ghost]: no experiment named ghost; known: a, b",
        ),
        (
            {
                "experiments": TWO | {"c": {"algorithm": "maml"}},
                "report": {"pairs": [["a", "b", "c"]]},
            },
            "report.pairs.0 = [a, b, c]: a pair is two distinct experiment names",
        ),
        (
            {"experiments": TWO, "report": {"pairs": [["a", "a"]]}},
            "report.pairs.0 = [a, a]: a pair is two distinct experiment names",
        ),
        (
            {"report": {"sort_by": "5w2s"}},
            "report.sort_by = 5w2s: not an evaluated setting; evaluated: 5w1s, 5w5s, 20w1s, 20w5s",
        ),
        (
            {
                "episodes": {"settings": ["5w1s", "20w5s"]},
                "evaluate": {"settings": ["5w1s"]},
                "report": {"sort_by": "20w5s"},
            },
            "report.sort_by = 20w5s: not an evaluated setting; evaluated: 5w1s",
        ),
        (
            {"episodes": {"settings": ["5w25s"]}},
            "episodes.settings = [5w25s]: 5w25s: 25 shots + 15 queries need 40 drawings per "
            "class; an Omniglot character has 20",
        ),
        (
            {"episodes": {"settings": ["5w1s"], "query_per_class": 20}},
            "episodes.settings = [5w1s]: 5w1s: 1 shots + 20 queries need 21 drawings",
        ),
        (
            {"episodes": {"settings": ["700w1s"]}},
            "episodes.settings = [700w1s]: 700w1s: 700-way tasks need 700 classes; "
            "the meta-test split has 659",
        ),
        (
            with_override("k_shot", 10) | {"train": {"query_per_class": 15}},
            "experiments.x.train.k_shot = 10: 10 shots + 15 queries need 25 drawings per class",
        ),
        (
            with_override("query_per_class", 20),
            "experiments.x.train.query_per_class = 20: 1 shots + 20 queries need 21 drawings",
        ),
        (
            {"train": {"k_shot": 5, "query_per_class": 16}},
            "train.k_shot = 5: 5 shots + 16 queries need 21 drawings per class",
        ),
        (
            with_override("n_way", 101),
            "experiments.x.train.n_way = 101: 101-way tasks need 101 classes; "
            "the validation split has 100",
        ),
        (
            {"train": {"n_way": 11}, "data": {"split": {"validation_characters": 10}}},
            "train.n_way = 11: 11-way tasks need 11 classes; the validation split has 10",
        ),
        (
            {"experiments": {"p": {"algorithm": "protonets", "options": {"train_n_way": 900}}}},
            "experiments.p.options.train_n_way = 900: 900-way tasks need 900 classes; "
            "the meta_train split has 864",
        ),
        (
            {"data": {"split": {"validation_characters": 964}}},
            "data.split.validation_characters = 964: must be below the 964 background characters",
        ),
        (
            {"experiments": {"../../x": {"algorithm": "maml"}}},
            "experiments.../../x = ../../x: names must match",
        ),
        (
            {"experiments": {"a b": {"algorithm": "maml"}}},
            "experiments.a b = a b: names must match",
        ),
        ({"rl_experiments": {"nav.v2": {}}}, "rl_experiments.nav.v2 = nav.v2: names must match"),
        (
            {"experiments": {"x": {"algorithm": "maml", "body_init": "../weights.pt"}}},
            "experiments.x.body_init = ../weights.pt: must be a path inside the project",
        ),
    ],
)
def test_cross_section_and_name_problems_stop_at_load(raw, expected):
    assert expected in one_line_error(raw)


def test_drawings_per_character_is_omniglots():
    # 19280 drawings of 964 background characters, 13180 of 659 evaluation characters.
    assert OMNIGLOT_DRAWINGS_PER_CHARACTER == 19280 // 964 == 13180 // 659 == 20
    validate_params({"episodes": {"settings": ["5w5s"], "query_per_class": 15}})  # 5+15 = 20
    validate_params(with_override("k_shot", 5))


def test_safe_names_and_consistent_sections_load():
    params = validate_params(
        {
            "experiments": {"maml-v2": {"algorithm": "maml"}, "B_1": {"algorithm": "protonets"}},
            "episodes": {"settings": ["5w1s", "20w5s"]},
            "evaluate": {"settings": ["20w5s"]},
            "report": {"sort_by": "20w5s", "pairs": [["maml-v2", "B_1"]]},
        }
    )
    assert params.report.pairs == [["maml-v2", "B_1"]]
    assert params.evaluation_settings() == ["20w5s"]


def test_default_sort_by_falls_back_to_the_first_evaluated_setting():
    assert validate_params({}).report.sort_by == "5w1s"
    params = validate_params({"episodes": {"settings": ["3w2s", "20w1s"]}})
    assert params.report.sort_by == "3w2s"


def write_params(tmp_path, raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_section_loaders_check_what_their_sections_allow(tmp_path):
    bad_episodes = write_params(tmp_path, {"episodes": {"settings": ["5w25s"]}})
    with pytest.raises(ParamsError, match=r"^params\.yaml: episodes\.settings = \[5w25s\]: "):
        load_data_params(bad_episodes)
    bad_name = write_params(tmp_path, {"rl_experiments": {"../x": {}}})
    with pytest.raises(ParamsError, match=r"^params\.yaml: rl_experiments\.\.\./x = "):
        load_rl_params(bad_name)
    # a data stage does not stop for another stage's section
    other = write_params(tmp_path, {"report": {"pairs": [["a", "ghost"]]}})
    assert load_data_params(other).episodes.settings


def test_stage_exits_2_with_one_line_for_a_cross_section_problem(tmp_path):
    bad = write_params(tmp_path, {"experiments": TWO, "report": {"pairs": [["a", "ghost"]]}})
    stage = (
        "from metalab.cli import run_stage, stage_parser\n"
        "from metalab.params import load_params\n"
        "def main(args, params):\n"
        "    print('main ran')\n"
        "run_stage(main, stage_parser(None), load_params)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", stage, "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: report.pairs.0 = [a, ghost]: no experiment named ghost; known: a, b"
    ]


def test_a_params_file_names_every_experiments_starting_body(tmp_path):
    # dvc.yaml makes body_init the train stage's dependency; DVC cannot use the default.
    path = write_params(tmp_path, {"experiments": {"x": {"algorithm": "maml"}}})
    with pytest.raises(ParamsError, match=r"experiments\.x\.body_init: missing; .*dvc\.yaml"):
        load_params(path)
    path = write_params(
        tmp_path, {"experiments": {"x": {"algorithm": "maml", "body_init": "models/pretrain/"}}}
    )
    assert load_params(path).experiment("x").body_init == "models/pretrain"


@pytest.mark.parametrize("path", [ROOT / "params.yaml", ROOT / "params" / "paper.yaml"])
def test_dvc_set_param_overrides_work_for_every_experiment(tmp_path, path):
    # `dvc exp run -S experiments.<name>.train.iterations=4` edits params.yaml through this
    # function; it refuses a key whose parent mapping is missing ("not in struct").
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    copy.write_text(path.read_text())
    names = list(yaml.safe_load(copy.read_text())["experiments"])
    keys = list(TrainConfig.model_fields)
    overrides = [f"experiments.{name}.train.iterations=4" for name in names]
    overrides += [f"experiments.{names[0]}.train.{key}=null" for key in keys if key != "iterations"]
    apply_overrides(copy, overrides)
    params = load_params(copy)
    for name in names:
        assert params.train_config(name).iterations == 4
    default = load_params(path)
    assert params.train_config(names[1]) == default.train_config(names[1]).model_copy(
        update={"iterations": 4}
    )
