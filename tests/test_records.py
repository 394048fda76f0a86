"""The typed schemas of the metrics files (`metalab.records`): every committed pair (metrics
file and info file) validates and is written back byte for byte, numbers and text go to
their files by declared type, bad files give a one-line error naming the file, the writers
build their metrics through the schemas, and the RL report follows whatever adaptation
steps were evaluated."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, get_args, get_origin

import numpy as np
import pytest
import torch
from pydantic import Field, RootModel, create_model

from metalab.evaluation import (
    LearnerEvaluation,
    SettingEvaluation,
    StepChoice,
    numeric_metrics,
    train_run_id,
)
from metalab.records import (
    DEVICE_FIELDS,
    SCHEMAS,
    AdaptationReturn,
    DataMetrics,
    EvaluationMetrics,
    MetricsFile,
    MetricsFileError,
    PrefetchMetrics,
    RLEvaluationMetrics,
    RLTrainSummary,
    TrainSummary,
    adaptation_key,
    adaptation_steps_of,
    info_path,
    is_info_file,
    schema_for,
)
from metalab.records.base import Schema
from metalab.report.collect import collect_inputs
from metalab.report.rl import plot_rl_adaptation, rl_markdown, rl_results

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "metrics"
COMMITTED = sorted(path for path in METRICS.rglob("*.json") if not is_info_file(path))
COMMITTED_INFO = sorted(path for path in METRICS.rglob("*.json") if is_info_file(path))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def relative(path: Path) -> str:
    return path.relative_to(METRICS).as_posix()


def committed(file: str) -> dict[str, Any]:
    """The whole record of committed metrics/`file` (numbers and text), as plain data."""
    return schema_for(file).read(METRICS / file).to_dict()


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    return [value]


def is_number(value: Any) -> bool:
    """A metrics file's leaf: a number, a boolean, or null for an unknown number."""
    return value is None or (isinstance(value, int | float) and math.isfinite(value))


# ------------------------------------------------------------------ committed files
def test_every_committed_metrics_file_has_a_schema_and_its_info_file():
    assert len(COMMITTED) > 20
    kinds = {schema_for(relative(path)) for path in COMMITTED}
    assert None not in kinds, [relative(p) for p in COMMITTED if schema_for(relative(p)) is None]
    assert kinds == set(SCHEMAS.values())  # every schema has a committed file to check
    with_info = [info_path(p) for p in COMMITTED if schema_for(relative(p)).has_info()]
    assert COMMITTED_INFO == sorted(with_info)  # each where its schema has text, no other
    assert not PrefetchMetrics.has_info() and len(with_info) == len(COMMITTED) - 1


@pytest.mark.parametrize("path", COMMITTED, ids=relative)
def test_committed_pair_validates_and_round_trips_byte_for_byte(path, tmp_path):
    record = schema_for(relative(path)).read(path)
    info = info_path(path)

    numbers, text = record.file_texts()
    assert numbers == path.read_text()
    assert text == (info.read_text() if info.exists() else None)
    copy = tmp_path / path.name
    record.write(copy)
    assert copy.read_bytes() == path.read_bytes()
    assert info_path(copy).exists() == info.exists()
    if info.exists():
        assert info_path(copy).read_bytes() == info.read_bytes()
    assert all(is_number(leaf) for leaf in leaves(json.loads(numbers)))
    assert schema_for(relative(path)).from_json_text(record.to_json()) == record


def test_committed_files_read_as_typed_attributes():
    maml = EvaluationMetrics.read(METRICS / "eval" / "maml.json")
    assert maml.settings["5w1s"].n_way == 5 and maml.settings["5w1s"].adaptation_steps == 3
    assert TrainSummary.read(METRICS / "train" / "maml.json").mlflow_run_id == maml.train_run_id
    rl = RLEvaluationMetrics.read(METRICS / "eval_rl" / "maml_rl-s0.json")
    assert rl.adaptation_steps == [0, 1, 2, 3] and rl.seed == 0
    assert rl.returns[0].mean_return < rl.returns[1].mean_return
    assert set(DataMetrics.read(METRICS / "data.json").archives) == {
        "images_background",
        "images_evaluation",
    }


# ------------------------------------------------------------------ numbers and text
def every_schema() -> list[type[MetricsFile]]:
    """Every schema class of `metalab.records` with fields, nested ones included."""
    found, pending = [], list(MetricsFile.__subclasses__())
    while pending:
        schema = pending.pop()
        pending += schema.__subclasses__()
        if schema.__module__.startswith("metalab.records") and schema.model_fields:
            found.append(schema)
    return sorted(set(found), key=lambda schema: schema.__name__)


def example(annotation: Any) -> Any:
    """A value of type `annotation` with every field filled (never None where a value is
    allowed), so that each declared field shows where it is written."""
    options = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not dict and options:  # Optional[X], Annotated[X, ...]
        return example(options[0])
    if annotation is bool:
        return True
    if annotation in (int, float, str):
        return {int: 7, float: 0.25, str: "text"}[annotation]
    if get_origin(annotation) is dict:
        key, value = get_args(annotation)
        return {(1 if key is int else "key"): example(value)}
    if issubclass(annotation, RootModel):
        return annotation(example(annotation.model_fields["root"].annotation))
    fields = annotation.model_fields.items()
    return annotation(**{name: example(field.annotation) for name, field in fields})


def test_every_schema_is_checked():
    names = {schema.__name__ for schema in every_schema()}
    assert {s.__name__ for s in SCHEMAS.values()} | {"SettingResult", "TrainRunReference"} <= names


@pytest.mark.parametrize("schema", every_schema(), ids=lambda schema: schema.__name__)
def test_a_full_record_puts_numbers_in_the_metrics_file_and_text_beside_it(schema, tmp_path):
    record = example(schema)
    whole = record.to_dict()
    assert None not in leaves(whole)  # every field is populated

    numbers, text = record.parts()

    assert numbers or text
    assert all(is_number(leaf) and not isinstance(leaf, str) for leaf in leaves(numbers))
    assert all(isinstance(leaf, str) for leaf in leaves(text))
    assert sorted(map(repr, leaves(numbers) + leaves(text))) == sorted(map(repr, leaves(whole)))
    assert schema.has_info() == bool(leaves(text))
    path = tmp_path / "record.json"
    record.write(path)
    assert json.loads(path.read_text()) == numbers
    assert info_path(path).exists() == schema.has_info()
    assert schema.read(path) == record


def test_a_new_field_goes_where_its_type_says_and_a_mixed_type_is_refused():
    class Annotated(TrainSummary):
        note: str = Field("", description="a remark")
        note_by_setting: dict[str, str] = Field(default_factory=dict)
        converged: bool = True

    record = Annotated.model_validate(
        {**committed("train/maml.json"), "note": "x", "note_by_setting": {"5w1s": "y"}}
    )
    numbers, text = record.parts()
    assert {"note", "note_by_setting"} <= set(text) and "converged" in numbers
    assert not {"note", "note_by_setting"} & set(numbers)
    for mixed in (int | str, list[float], Any, dict[float, int]):
        with pytest.raises(TypeError, match="metrics field|mapping keys"):
            create_model("Mixed", __base__=Schema, value=(mixed, ...))


# ------------------------------------------------------------------ bad files
def _text(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=2)


# {problem: (which file, its new content from the committed one, what the message says)}
BAD_TRAIN_FILES = {
    "not JSON": ("metrics", lambda _: "{", "not valid JSON"),
    "not an object": ("metrics", lambda _: "[1, 2]", "not a JSON object"),
    "missing field": ("metrics", lambda c: "{}", "iterations: Field required"),
    # strict: a string is not taken for a number
    "wrong type": ("metrics", lambda c: _text({**c, "iterations": "300"}), "iterations: Input"),
    "unknown key": ("metrics", lambda c: _text({**c, "colour": 1}), "colour: Extra inputs"),
    "text in metrics": (
        "metrics",
        lambda c: _text({**c, "experiment": "maml"}),
        "text fields belong in maml.info.json: experiment",
    ),
    "info not JSON": ("info", lambda _: "{", "not valid JSON"),
    "info not an object": ("info", lambda _: '"maml"', "not a JSON object"),
    "info missing field": ("info", lambda c: "{}", "experiment: Field required"),
    "info wrong type": ("info", lambda c: _text({**c, "experiment": 3}), "experiment: Input"),
    "info unknown key": ("info", lambda c: _text({**c, "colour": "blue"}), "colour: Extra"),
    "numbers in info": (
        "info",
        lambda c: _text({**c, "iterations": 300}),
        "numeric fields belong in maml.json: iterations",
    ),
}


@pytest.mark.parametrize("problem", BAD_TRAIN_FILES)
def test_bad_file_is_a_one_line_error_naming_it(problem, tmp_path):
    which, corrupt, expected = BAD_TRAIN_FILES[problem]
    path = tmp_path / "metrics" / "train" / "maml.json"
    TrainSummary.read(METRICS / "train" / "maml.json").write(path)
    bad = path if which == "metrics" else info_path(path)
    bad.write_text(corrupt(json.loads(bad.read_text())))

    with pytest.raises(MetricsFileError) as caught:
        TrainSummary.read(path)

    message = str(caught.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message
    assert expected in message
    other = info_path(path) if which == "metrics" else path
    assert str(other) not in message  # only the file at fault is named


def test_problems_in_both_files_name_both_on_one_line(tmp_path):
    path = tmp_path / "maml.json"
    TrainSummary.read(METRICS / "train" / "maml.json").write(path)
    path.write_text(_text({**json.loads(path.read_text()), "iterations": 1.5}))
    info_path(path).write_text(_text({**json.loads(info_path(path).read_text()), "algorithm": 2}))

    with pytest.raises(MetricsFileError) as caught:
        TrainSummary.read(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: not a valid train summary: iterations: ") and (
        f"; {info_path(path)}: algorithm: Input should be a valid string" in message
    )
    assert "\n" not in message


def test_a_split_field_must_be_an_object_in_both_files(tmp_path):
    path = tmp_path / "maml.json"
    EvaluationMetrics.read(METRICS / "eval" / "maml.json").write(path)
    info_path(path).write_text(_text({**json.loads(info_path(path).read_text()), "settings": 1}))

    with pytest.raises(MetricsFileError) as caught:
        EvaluationMetrics.read(path)

    assert str(caught.value) == f"{info_path(path)}: settings: not an object, but also in maml.json"


def test_missing_files_and_rl_step_key_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(MetricsFileError, match=r"^.*nothing\.json: missing \(train summary\)$"):
        TrainSummary.read(tmp_path / "nothing.json")
    with pytest.raises(MetricsFileError, match=r"maml\.info\.json: an info file \(read the"):
        TrainSummary.read(METRICS / "train" / "maml.info.json")
    alone = tmp_path / "alone.json"  # a metrics file without its info file
    alone.write_text((METRICS / "train" / "maml.json").read_text())
    with pytest.raises(MetricsFileError) as caught:
        TrainSummary.read(alone)
    assert (
        str(caught.value)
        == f"{info_path(alone)}: missing (the text of the train summary alone.json)"
    )
    path = tmp_path / "rl.json"
    RLEvaluationMetrics.read(METRICS / "eval_rl" / "maml_rl-s0.json").write(path)
    content = json.loads(path.read_text())
    content["after_2_steps"]["std"] = "wide"
    content["after_02_steps"] = content["after_1_steps"]  # not how the stage spells 2
    path.write_text(json.dumps(content))
    with pytest.raises(MetricsFileError) as caught:
        RLEvaluationMetrics.read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a valid RL evaluation summary: ")
    assert "after_2_steps.std: Input should be a valid number" in message
    assert "after_02_steps: Extra inputs are not permitted" in message


def test_unknown_numbers_are_null_and_required_numbers_must_be_finite():
    train = committed("train/maml.json")
    train["final_loss"] = math.nan
    assert TrainSummary(**train).to_dict()["final_loss"] is None
    train["training_seconds"] = math.inf
    with pytest.raises(ValueError, match="finite"):
        TrainSummary(**train)


# ------------------------------------------------------------------ device fields
DEVICE_SCHEMAS = {
    "train/maml.json": TrainSummary,
    "eval/maml.json": EvaluationMetrics,
    "train_rl/maml_rl-s0.json": RLTrainSummary,
    "eval_rl/maml_rl-s0.json": RLEvaluationMetrics,
}
GPU_RUN = {
    "peak_memory_mb": 2100.0,
    "gpu_peak_allocated_mb": 812.5,
    "gpu_peak_reserved_mb": 1024.0,
    "device": "cuda:0",
    "device_name": "NVIDIA A100-SXM4-80GB",
    "threads": 8,
    "torch_version": "2.14.1+cu128",
    "cuda_version": "12.8",
}


@pytest.mark.parametrize("file", DEVICE_SCHEMAS)
def test_summaries_record_the_device_and_gpu_peaks_of_a_gpu_run(file):
    schema = DEVICE_SCHEMAS[file]
    # as written before the device fields existed (the RL files are newer)
    before = {key: value for key, value in committed(file).items() if key not in DEVICE_FIELDS}
    record = schema.from_json_text(json.dumps({**before, **GPU_RUN}))

    data = record.to_dict()
    assert {key: data[key] for key in GPU_RUN} == GPU_RUN
    keys = list(data)
    position = keys.index("peak_memory_mb")
    assert keys[position : position + len(GPU_RUN)] == list(GPU_RUN)  # one block, file order
    assert schema.from_json_text(record.to_json()) == record
    numbers, text = record.parts()
    text_fields = {"device", "device_name", "torch_version", "cuda_version"}
    assert set(GPU_RUN) - set(numbers) == text_fields == set(GPU_RUN) & set(text)


@pytest.mark.parametrize("file", DEVICE_SCHEMAS)
def test_a_cpu_runs_summary_leaves_out_what_it_does_not_have(file):
    from metalab.device import device_record
    from metalab.tracking import memory_figures

    cpu = torch.device("cpu")
    schema = DEVICE_SCHEMAS[file]
    figures = {**asdict(device_record(cpu)), **memory_figures(cpu)}
    record = schema.from_json_text(json.dumps({**committed(file), **figures}))

    data = json.loads(record.to_json())
    assert data["device"] == "cpu" and data["threads"] == torch.get_num_threads()
    assert not {"gpu_peak_allocated_mb", "gpu_peak_reserved_mb"} & set(data)
    assert ("cuda_version" in data) == (torch.version.cuda is not None)
    assert "null" not in json.dumps({key: data[key] for key in DEVICE_FIELDS & set(data)})
    assert record.gpu_peak_allocated_mb is None and record.cuda_version == torch.version.cuda


def test_device_fields_are_type_checked():
    train = committed("train/maml.json")
    with pytest.raises(MetricsFileError, match=r"threads: Input should be a valid integer"):
        TrainSummary.from_json_text(json.dumps({**train, "threads": "8"}))
    with pytest.raises(MetricsFileError, match=r"gpu_model: Extra inputs are not permitted"):
        TrainSummary.from_json_text(json.dumps({**train, "gpu_model": "A100"}))


# ------------------------------------------------------------------ writers
def test_evaluation_metrics_are_built_through_the_schema():
    rng = np.random.default_rng(0)
    gradient = SettingEvaluation(
        setting="5w1s",
        n_way=5,
        k_shot=1,
        episode_set="abc",
        adaptation_steps=3,
        accuracy_after=rng.uniform(0.6, 1.0, 10),
        accuracy_before=rng.uniform(0.1, 0.3, 10),
        seconds=np.full(10, 0.5),
        # as the committed run records its trained setting: the trained steps kept
        step_choice=StepChoice(3, trained_setting=True, accuracies={}),
    )
    single = SettingEvaluation(
        setting="20w1s",
        n_way=20,
        k_shot=1,
        episode_set="def",
        adaptation_steps=None,
        accuracy_after=np.array([0.5]),  # one episode: no interval
        accuracy_before=None,
        seconds=np.array([1.0]),
    )
    unsupported = SettingEvaluation(
        "20w5s", 20, 5, "ghi", None, np.zeros(0), None, np.zeros(0), unsupported="too wide"
    )
    evaluation = LearnerEvaluation(
        "maml", "maml", {"5w1s": gradient, "20w1s": single, "20w5s": unsupported}
    )

    maml = committed("eval/maml.json")
    # where it ran, as the committed file records it (which fields depends on the run)
    device = {key: maml[key] for key in maml if key in DEVICE_FIELDS}
    record = evaluation.record(peak_memory_mb=12.5, **device, train_run_id="t", mlflow_run_id="e")

    assert isinstance(record, EvaluationMetrics)
    assert list(record.to_dict()) == list(maml)  # the file's keys, in its order
    assert list(record.to_dict()["settings"]["5w1s"]) == list(maml["settings"]["5w1s"])
    assert record.settings["5w1s"].gain == pytest.approx(
        (gradient.accuracy_after - gradient.accuracy_before).mean()
    )
    assert record.settings["20w1s"].ci95 is None and record.settings["20w1s"].gain is None
    assert record.unsupported == {"20w5s": "too wide"}
    assert record.episodes == 11 and record.evaluation_seconds == pytest.approx(6.0)
    assert EvaluationMetrics.from_json_text(record.to_json()) == record
    assert (
        evaluation.metrics(peak_memory_mb=12.5, **device)
        == record.model_copy(update={"train_run_id": None, "mlflow_run_id": None}).to_dict()
    )
    numbers = numeric_metrics(record)
    assert numbers["settings.5w1s.accuracy"] == record.settings["5w1s"].accuracy
    assert "settings.20w1s.ci95" not in numbers and numbers["episodes"] == 11.0


def test_train_run_id_reads_only_the_run_id(tmp_path):
    path = tmp_path / "train.json"
    assert train_run_id(path) is None
    path.write_text("{}")
    info_path(path).write_text(json.dumps({"mlflow_run_id": "abc"}))  # partial ones link
    assert train_run_id(path) == "abc"
    committed_train = METRICS / "train" / "maml.json"
    committed_id = json.loads(info_path(committed_train).read_text())["mlflow_run_id"]
    assert len(committed_id) == 32 and train_run_id(committed_train) == committed_id
    info_path(path).write_text("not json")
    with pytest.raises(MetricsFileError, match=r"train\.info\.json: not valid JSON"):
        train_run_id(path)
    info_path(path).unlink()
    with pytest.raises(MetricsFileError, match=r"train\.info\.json: missing"):
        train_run_id(path)


# ------------------------------------------------------------------ meta-RL, any steps
def test_adaptation_keys_are_the_files_keys():
    assert [adaptation_key(s) for s in (0, 1, 5, 12)] == [
        "before_adaptation",
        "after_1_steps",
        "after_5_steps",
        "after_12_steps",
    ]
    for steps in (0, 1, 5, 12):
        assert adaptation_steps_of(adaptation_key(steps)) == steps
    assert adaptation_steps_of("after_0_steps") is None
    assert adaptation_steps_of("num_tasks") is None


def rl_evaluation(name: str, env: str, steps: list[int], start: float) -> RLEvaluationMetrics:
    """Return rising by one per adaptation step from `start`."""
    return RLEvaluationMetrics(
        experiment=name,
        algorithm="maml_rl",
        env=env,
        num_tasks=20,
        returns={s: AdaptationReturn(mean_return=start + s, ci95=0.5, std=1.1) for s in steps},
    )


def test_rl_evaluation_with_five_steps_round_trips_in_file_layout():
    record = rl_evaluation("maml_rl", "navigation_2d", [0, 1, 2, 3, 4, 5], -40.0)

    data = json.loads(record.to_json())
    steps = ["before_adaptation", *(f"after_{s}_steps" for s in range(1, 6))]
    assert list(data) == ["experiment", "algorithm", "env", "num_tasks", *steps]
    assert data["after_5_steps"] == {"mean_return": -35.0, "ci95": 0.5, "std": 1.1}
    assert RLEvaluationMetrics.from_json_text(record.to_json()) == record
    numbers, text = record.parts()
    assert list(numbers) == ["num_tasks", *steps]
    assert list(text) == ["experiment", "algorithm", "env"]


def test_rl_report_with_five_adaptation_steps(tmp_path):
    rl_evaluation("maml_rl", "navigation_2d", [0, 1, 2, 3, 4, 5], -40.0).write(
        tmp_path / "eval_rl" / "maml_rl.json"
    )
    rl_evaluation("anil_rl", "navigation_2d", [0, 1, 2, 3, 5], -50.0).write(  # no 4
        tmp_path / "eval_rl" / "anil_rl.json"
    )
    RLTrainSummary(
        experiment="maml_rl",
        algorithm="maml_rl",
        env="navigation_2d",
        iterations=10,
        training_seconds=30.0,
        tasks_per_s=8.0,
        final_pre_adaptation_return=-40.0,
        final_post_adaptation_return=-35.0,
        peak_memory_mb=900.0,
        mlflow_run_id=None,
    ).write(tmp_path / "train_rl" / "maml_rl.json")

    results = rl_results(tmp_path)

    assert len(results) == 11
    maml = results[results["experiment"] == "maml_rl"].set_index("steps")
    assert list(maml.index) == [0, 1, 2, 3, 4, 5] and maml.loc[5, "mean_return"] == -35.0
    text = rl_markdown(results)
    assert (
        "| experiment | env | seeds | before | after 1 step | after 2 steps | after 3 steps "
        "| after 4 steps | after 5 steps | gain (at steps) | training | tasks/s | peak MB |"
    ) in text
    assert (
        "| maml_rl | navigation_2d | 1 | -40.00 ± 0.50 | -39.00 ± 0.50 | -38.00 ± 0.50 "
        "| -37.00 ± 0.50 | -36.00 ± 0.50 | -35.00 ± 0.50 | +1.00 (1) | 30.0 s | 8.0 | 900 |"
    ) in text
    assert "| -47.00 ± 0.50 | - | -45.00 ± 0.50 | +1.00 (1) | - | - | - |" in text
    path = plot_rl_adaptation(results, tmp_path / "rl.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 10_000


def test_rl_gain_column_follows_the_fewest_evaluated_steps(tmp_path):
    rl_evaluation("reptile_rl", "bernoulli_bandit", [0, 2, 4], 10.0).write(
        tmp_path / "eval_rl" / "reptile_rl.json"
    )
    text = rl_markdown(rl_results(tmp_path))
    assert "| before | after 2 steps | after 4 steps | gain (at steps) |" in text
    assert "| 10.00 ± 0.50 | 12.00 ± 0.50 | 14.00 ± 0.50 | +2.00 (2) |" in text


def test_report_notes_invalid_metrics_files_instead_of_failing(tmp_path):
    (tmp_path / "eval_rl").mkdir()
    (tmp_path / "eval_rl" / "broken.json").write_text('{"num_tasks": 3}')
    (tmp_path / "eval_rl" / "broken.info.json").write_text('{"experiment": "broken"}')
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "maml.json").write_text('{"iterations": 3}')
    (tmp_path / "train" / "maml.info.json").write_text('{"experiment": "maml"}')

    with pytest.raises(MetricsFileError, match="broken.json: not a valid RL evaluation"):
        rl_results(tmp_path)
    notes: list[str] = []
    assert rl_results(tmp_path, notes).empty
    inputs = collect_inputs(tmp_path, tmp_path / "plots", ["maml"])
    notes += inputs.notes
    assert inputs.experiments["maml"].train is None
    assert any(
        note.startswith(f"{tmp_path / 'eval_rl' / 'broken.json'}: not a valid") for note in notes
    )
    assert any("maml.json: not a valid train summary" in note for note in notes)


def test_rl_evaluation_references_round_trip_and_report_their_file_keys(tmp_path):
    committed = RLEvaluationMetrics.read(METRICS / "eval_rl" / "maml_rl-s0.json")
    committed = committed.model_copy(update={"references": {}, "trained_steps": None})
    extended = committed.model_copy(
        update={
            "trained_steps": 1,
            "trajectories_per_task": 40,
            "eval_step_schedule": "halve_after_first",
            "references": {
                "oracle": dict(committed.returns),
                "random_init": {0: committed.returns[0]},
            },
        }
    )
    path = tmp_path / "rl.json"
    extended.write(path)
    numbers = json.loads(path.read_text())
    text = json.loads(info_path(path).read_text())
    assert numbers["reference_random_init"] == {"before_adaptation": asdict_return(committed)}
    assert set(numbers["reference_oracle"]) == {adaptation_key(s) for s in committed.returns}
    assert numbers["trained_steps"] == 1 and text["eval_step_schedule"] == "halve_after_first"
    again = RLEvaluationMetrics.read(path)
    assert again == extended and again.file_texts() == extended.file_texts()
    numbers["reference_oracle"]["after_1_steps"]["ci95"] = "narrow"
    path.write_text(json.dumps(numbers))
    with pytest.raises(MetricsFileError, match=r"reference_oracle\.after_1_steps\.ci95"):
        RLEvaluationMetrics.read(path)


def asdict_return(record: RLEvaluationMetrics) -> dict:
    return record.returns[0].model_dump()
