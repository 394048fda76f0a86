"""params.yaml validation: bad input names the dotted key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metalab.data.config import parse_setting
from metalab.params import ParamsError, load_params, validate_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.data.image_size in (28, 105)
    assert params.episodes.num_episodes >= 1


def test_paper_params_file_covers_every_experiment_with_paper_budgets():
    default = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params" / "paper.yaml")
    assert set(paper.experiments) == set(default.experiments)
    assert paper.data.split.protocol == "vinyals"
    assert paper.evaluate.max_episodes is None
    maml = paper.train_config("maml")
    assert (maml.meta_batch_size, maml.iterations) == (32, 60000)
    assert paper.experiment("maml").options.inner_lr == 0.4
    assert paper.experiment("protonets").options.train_n_way == 60
    for name in default.experiments:
        assert paper.train_config(name).iterations > default.train_config(name).iterations


@pytest.mark.parametrize("path", [ROOT / "params.yaml", ROOT / "params" / "paper.yaml"])
def test_maml_bf16_differs_from_maml_only_in_precision(path):
    # The report's [maml, maml_bf16] pair measures bf16's effect only if nothing else differs.
    params = load_params(path)
    fp32, bf16 = params.experiment("maml"), params.experiment("maml_bf16")
    assert (fp32.algorithm, fp32.model, fp32.pretrained) == (
        bf16.algorithm,
        bf16.model,
        bf16.pretrained,
    )
    assert params.experiment("maml").options == params.experiment("maml_bf16").options
    fp32_train, bf16_train = params.train_config("maml"), params.train_config("maml_bf16")
    assert (fp32_train.precision, bf16_train.precision) == ("fp32", "bf16")
    assert fp32_train.model_copy(update={"precision": "bf16"}) == bf16_train
    assert ["maml", "maml_bf16"] in [list(pair) for pair in params.report.pairs]


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
