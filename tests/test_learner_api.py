"""The public learner API: model files round-trip, training preprocessing, other way
counts, and clear errors."""

from __future__ import annotations

import zipfile

import pytest
import torch
from PIL import Image, ImageDraw

import metalab
from metalab.algorithms.base import BuildContext, MetaLearner
from metalab.algorithms.registry import ALGORITHMS, build_learner, options_class
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.io import save_torch
from metalab.learner_api import (
    MODEL_FORMAT,
    ModelFileError,
    UnsupportedTaskError,
    load_learner,
)
from metalab.models.config import ModelConfig
from metalab.params import validate_params
from metalab.training import Trainer

IMAGE_SIZE = 28
TRAINED_WAYS = 5
# Few test-time steps keep gradient learners fast; the defaults are checked separately.
SMALL_OPTIONS = {"reptile": {"test_inner_steps": 2}, "cavia": {"test_inner_steps": 2}}
# Every registered learner: one whose module is missing fails here instead of being skipped.
AVAILABLE = sorted(ALGORITHMS)


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: tiny convolutions are far slower when several busy processes
    share the cores and torch spins up a thread pool in each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer_like_payload(
    algorithm: str, options: dict | None = None, seed: int = 0
) -> tuple[dict, MetaLearner]:
    """What `Trainer.model_payload` writes, for a freshly built tiny learner."""
    torch.manual_seed(seed)
    validated = options_class(algorithm).model_validate(
        options if options is not None else SMALL_OPTIONS.get(algorithm, {})
    )
    model = ModelConfig(hidden=8)
    context = BuildContext(model=model, n_way=TRAINED_WAYS, image_size=IMAGE_SIZE)
    learner = build_learner(algorithm, validated, context)
    return {
        "format": MODEL_FORMAT,
        "experiment": f"tiny_{algorithm}",
        "algorithm": algorithm,
        "options": validated.model_dump(),
        "model": model.model_dump(),
        "n_way": TRAINED_WAYS,
        "k_shot": 1,
        "image_size": IMAGE_SIZE,
        "precision": "fp32",
        "state_dict": learner.state_dict(),
        "best_iteration": 1,
        "validation_accuracy": 0.5,
    }, learner


def task(n_way: int, k_shot: int = 2, queries: int = 3, seed: int = 1):
    """Random images: support [N*K, 1, S, S], labels [N*K] class-major, queries [N*Q, ...]."""
    generator = torch.Generator().manual_seed(seed)
    support_x = torch.rand(n_way * k_shot, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    support_y = torch.arange(n_way).repeat_interleave(k_shot)
    query_x = torch.rand(n_way * queries, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return support_x, support_y, query_x


@pytest.mark.parametrize("algorithm", AVAILABLE)
def test_round_trip_gives_the_same_predictions(tmp_path, algorithm):
    payload, original = trainer_like_payload(algorithm)
    path = tmp_path / f"{algorithm}.pt"
    save_torch(path, payload)

    learner = metalab.load_learner(path)

    assert isinstance(learner, metalab.Learner)
    assert (learner.algorithm, learner.n_way, learner.image_size) == (algorithm, 5, IMAGE_SIZE)
    assert learner.experiment == f"tiny_{algorithm}"
    loaded_state = learner.meta_learner.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
    support_x, support_y, query_x = task(TRAINED_WAYS)
    torch.manual_seed(3)
    logits = learner.adapt(support_x, support_y).predict(query_x)
    torch.manual_seed(3)
    expected = original.eval().adapt(support_x, support_y)(query_x)
    assert logits.shape == (15, TRAINED_WAYS)
    torch.testing.assert_close(logits, expected.detach())


@pytest.mark.parametrize("algorithm", AVAILABLE)
def test_five_way_model_adapts_to_three_way_tasks(tmp_path, algorithm):
    payload, _ = trainer_like_payload(algorithm)
    save_torch(tmp_path / "model.pt", payload)
    learner = load_learner(tmp_path / "model.pt")
    support_x, support_y, query_x = task(3, k_shot=1, queries=4)

    adapted = learner.adapt(support_x, support_y)
    logits = adapted.predict(query_x)

    assert adapted.n_way == 3
    assert logits.shape == (12, 3)
    assert torch.isfinite(logits).all()


def test_more_ways_than_cavia_has_outputs_is_a_clear_error(tmp_path):
    payload, _ = trainer_like_payload("cavia")
    save_torch(tmp_path / "cavia.pt", payload)
    learner = load_learner(tmp_path / "cavia.pt")
    support_x, support_y, _ = task(7, k_shot=1)

    with pytest.raises(UnsupportedTaskError, match=r"trained 5-way\) cannot handle a 7-way"):
        learner.adapt(support_x, support_y, steps=1)


def test_gradient_learner_reports_its_default_steps(tmp_path):
    payload, _ = trainer_like_payload("reptile", {"test_inner_steps": 13})
    save_torch(tmp_path / "reptile.pt", payload)
    learner = load_learner(tmp_path / "reptile.pt")
    assert learner.adapts_by_gradient
    assert learner.default_adaptation_steps == 13


def test_loads_what_the_trainer_saves(tmp_path, tiny_prefetched_28):
    arrays = load_prefetched(tiny_prefetched_28)
    params = validate_params(
        {
            "data": {"split": {"validation_characters": 5}},
            "train": {
                "n_way": 3,
                "query_per_class": 2,
                "meta_batch_size": 2,
                "iterations": 2,
                "threads": 1,
                "validate_every": 1,
                "validation_episodes": 2,
            },
            "experiments": {
                "anil": {
                    "algorithm": "maml",
                    "model": {"hidden": 8},
                    "options": {"adapt_parameters": "head", "test_inner_steps": 2},
                }
            },
        }
    )
    split = make_split(arrays.character_origin, params.data.split)
    trainer = Trainer("anil", params, arrays, split, tmp_path / "checkpoints", progress=False)
    trainer.run()
    trainer.save_model(tmp_path / "anil.pt")

    learner = load_learner(tmp_path / "anil.pt")

    assert (learner.experiment, learner.algorithm, learner.n_way) == ("anil", "maml", 3)
    assert learner.adapts_by_gradient and learner.default_adaptation_steps == 2
    trainer.learner.load_state_dict(trainer.best_state)
    support_x, support_y, query_x = task(3)
    logits = learner.adapt(support_x, support_y).predict(query_x)
    expected = trainer.learner.eval().adapt(support_x, support_y)(query_x)
    torch.testing.assert_close(logits, expected.detach())


# ---------------------------------------------------------------------- preprocessing
def stroke_image(mode: str = "1") -> Image.Image:
    """A 105x105 drawing: black strokes on white paper, like an Omniglot PNG."""
    image = Image.new("L", (105, 105), 255)
    pen = ImageDraw.Draw(image)
    pen.line([(20, 20), (80, 70), (30, 90)], fill=0, width=6)
    return image.convert(mode)


def any_learner(tmp_path):
    payload, _ = trainer_like_payload(AVAILABLE[0])
    save_torch(tmp_path / "model.pt", payload)
    return load_learner(tmp_path / "model.pt")


def test_transform_matches_the_prefetched_training_images(
    tmp_path, tiny_omniglot_dir, tiny_prefetched_28
):
    arrays = load_prefetched(tiny_prefetched_28)
    learner = any_learner(tmp_path)
    row = 3  # character 0, its 4th drawer
    character = arrays.character_names[int(arrays.character[row])]
    suffix = f"_{int(arrays.drawer[row]):02d}.png"
    with zipfile.ZipFile(tiny_omniglot_dir / "images_background.zip") as archive:
        (member,) = [
            name
            for name in archive.namelist()
            if f"/{character}/" in name and name.endswith(suffix)
        ]
        with archive.open(member) as handle, Image.open(handle) as image:
            image.load()
            assert image.mode == "1"
            transformed = learner.transform(image)

    expected = arrays.images[row].to(torch.float32) / 255.0
    assert transformed.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert transformed.dtype == torch.float32
    assert torch.equal(transformed[0], expected)


def test_transform_makes_ink_bright_and_accepts_common_modes(tmp_path):
    learner = any_learner(tmp_path)
    blank = learner.transform(Image.new("L", (105, 105), 255))
    full = learner.transform(Image.new("L", (105, 105), 0))
    assert torch.equal(blank, torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE))
    assert torch.equal(full, torch.ones(1, IMAGE_SIZE, IMAGE_SIZE))
    grey = learner.transform(stroke_image("L"))
    assert grey.max() == 1.0 and grey.mean() > 0.02  # strokes survive the resize
    assert torch.equal(learner.transform(stroke_image("RGB")), grey)
    path = tmp_path / "drawing.png"
    stroke_image("L").save(path)
    assert torch.equal(learner.transform(path), grey)


def test_transformed_images_drive_adaptation(tmp_path):
    payload, _ = trainer_like_payload("protonets")
    save_torch(tmp_path / "p.pt", payload)
    learner = load_learner(tmp_path / "p.pt")
    images = [stroke_image(), stroke_image().rotate(90), stroke_image().transpose(0)]
    support_x = torch.stack([learner.transform(image) for image in images])
    adapted = learner.adapt(support_x, torch.tensor([0, 1, 2]))
    logits = adapted.predict(support_x)
    # Each support image is its own prototype, at distance 0: the largest logit.
    assert torch.equal(logits.argmax(dim=1), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------ errors
def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_learner(tmp_path / "nothing.pt")


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not a metalab model file"):
        load_learner(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="no 'format' entry"):
        load_learner(other)


def test_unknown_format_version_is_a_clear_error(tmp_path):
    payload, _ = trainer_like_payload(AVAILABLE[0])
    payload["format"] = MODEL_FORMAT + 98
    save_torch(tmp_path / "future.pt", payload)
    with pytest.raises(ModelFileError, match=f"format {MODEL_FORMAT + 98}.*reads format"):
        load_learner(tmp_path / "future.pt")


def test_unknown_algorithm_and_mismatched_weights_are_clear_errors(tmp_path):
    payload, _ = trainer_like_payload(AVAILABLE[0])
    save_torch(tmp_path / "a.pt", {**payload, "algorithm": "telepathy"})
    with pytest.raises(ModelFileError, match="unknown algorithm 'telepathy'"):
        load_learner(tmp_path / "a.pt")
    save_torch(tmp_path / "b.pt", {**payload, "model": {"name": "conv4", "hidden": 16}})
    with pytest.raises(ModelFileError, match="weights do not fit"):
        load_learner(tmp_path / "b.pt")


def test_bad_task_inputs_are_clear_errors(tmp_path):
    learner = any_learner(tmp_path)
    support_x, support_y, _ = task(3, k_shot=1)
    with pytest.raises(ValueError, match=r"support_x must have shape \[B, 1, 28, 28\]"):
        learner.adapt(torch.rand(3, 1, 32, 32), support_y)
    with pytest.raises(ValueError, match="every class present"):
        learner.adapt(support_x, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="one label per support image"):
        learner.adapt(support_x, torch.tensor([0, 1]))


def one_line_error(excinfo: pytest.ExceptionInfo[ValueError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def protonets_learner(tmp_path_factory):
    """A tiny protonets learner: deterministic and fast, for input checks."""
    payload, _ = trainer_like_payload("protonets")
    path = tmp_path_factory.mktemp("protonets") / "p.pt"
    save_torch(path, payload)
    return load_learner(path)


# ----------------------------------------------------------------- image values
@pytest.mark.parametrize(
    ("bad", "expected"),
    [(float("nan"), "1 NaN"), (float("inf"), "1 \\+inf"), (float("-inf"), "1 -inf")],
)
@pytest.mark.parametrize("argument", ["support_x", "query_x"])
def test_non_finite_images_are_rejected(protonets_learner, argument, bad, expected):
    support_x, support_y, query_x = task(3, k_shot=1)
    images = {"support_x": support_x, "query_x": query_x}[argument]
    images[1, 0, 5, 7] = bad
    with pytest.raises(ValueError, match=rf"^{argument} has non-finite values \({expected}\)"):
        protonets_learner.adapt(support_x, support_y).predict(query_x)


def test_non_finite_message_counts_each_kind(protonets_learner):
    support_x, support_y, _ = task(3, k_shot=1)
    support_x[0, 0, 0, :3] = torch.tensor([float("nan"), float("nan"), float("-inf")])
    with pytest.raises(ValueError) as excinfo:
        protonets_learner.adapt(support_x, support_y)
    message = one_line_error(excinfo)
    assert "(2 NaN, 1 -inf)" in message and "[0, 1]" in message


@pytest.mark.parametrize("argument", ["support_x", "query_x"])
def test_pixels_in_0_to_255_are_rejected_with_a_hint(protonets_learner, argument):
    support_x, support_y, query_x = task(3, k_shot=1)
    images = {"support_x": support_x, "query_x": query_x}[argument]
    images.mul_(255.0).round_()
    images[0, 0, 0, 0] = 255.0
    with pytest.raises(ValueError) as excinfo:
        protonets_learner.adapt(support_x, support_y).predict(query_x)
    message = one_line_error(excinfo)
    assert message.startswith(f"{argument} has values outside [0, 1] (max 255.0): ")
    assert "ink = 1.0, paper = 0.0" in message and "divide 0..255 pixels by 255" in message


@pytest.mark.parametrize("argument", ["support_x", "query_x"])
def test_values_just_outside_0_1_are_rejected(protonets_learner, argument):
    support_x, support_y, query_x = task(3, k_shot=1)
    images = {"support_x": support_x, "query_x": query_x}[argument]
    images.sub_(0.5)  # e.g. mean-centred images
    images[0, 0, 0, 0] = -0.5
    with pytest.raises(ValueError) as excinfo:
        protonets_learner.adapt(support_x, support_y).predict(query_x)
    message = one_line_error(excinfo)
    assert message.startswith(f"{argument} has values outside [0, 1] (min -0.5): ")
    assert "divide" not in message
    images.add_(0.5)
    images[0, 0, 0, 0] = 1.0 + 1e-6
    with pytest.raises(ValueError, match=rf"^{argument} has values outside \[0, 1\] \(max 1"):
        protonets_learner.adapt(support_x, support_y).predict(query_x)


def test_exact_paper_and_ink_values_are_accepted(protonets_learner):
    support_x = torch.stack([torch.zeros(1, 28, 28), torch.ones(1, 28, 28)])
    adapted = protonets_learner.adapt(support_x, torch.tensor([0, 1]))
    logits = adapted.predict(support_x)
    assert torch.equal(logits.argmax(dim=1), torch.tensor([0, 1]))


# ------------------------------------------------------------------- transparency
def strokes_on(mode: str, background, ink) -> Image.Image:
    """The `stroke_image` strokes drawn with ``ink`` on a ``background`` of ``mode``."""
    image = Image.new(mode, (105, 105), background)
    ImageDraw.Draw(image).line([(20, 20), (80, 70), (30, 90)], fill=ink, width=6)
    return image


def transparent_colour(image: Image.Image, colour) -> Image.Image:
    """``image`` with ``colour`` marked transparent (a PNG tRNS entry)."""
    image.info["transparency"] = colour
    return image


def transparent_palette_strokes() -> Image.Image:
    """Mode "P": index 0 black and transparent (the background), index 1 black ink."""
    image = strokes_on("P", 0, 1)
    image.putpalette([0, 0, 0, 0, 0, 0])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: strokes_on("RGBA", (0, 0, 0, 0), (0, 0, 0, 255)), id="RGBA"),
        pytest.param(lambda: strokes_on("LA", (0, 0), (0, 255)), id="LA"),
        pytest.param(transparent_palette_strokes, id="P-transparent-index"),
        pytest.param(lambda: transparent_palette_strokes().convert("PA"), id="PA"),
        pytest.param(lambda: transparent_colour(strokes_on("L", 128, 0), 128), id="L"),
        pytest.param(
            lambda: transparent_colour(strokes_on("RGB", (9, 200, 30), 0), (9, 200, 30)), id="RGB"
        ),
    ],
)
def test_transparent_background_is_white_paper(tmp_path, protonets_learner, make):
    opaque = protonets_learner.transform(stroke_image("L"))
    image = make()
    transformed = protonets_learner.transform(image)
    assert torch.equal(transformed, opaque)
    if image.mode != "PA":  # PNG cannot store mode PA
        # The same through a PNG file (tRNS chunk / alpha channel as stored on disk).
        path = tmp_path / "transparent.png"
        image.save(path)
        assert torch.equal(protonets_learner.transform(path), opaque)


def test_half_transparent_ink_is_half_ink(protonets_learner):
    image = Image.new("RGBA", (105, 105), (0, 0, 0, 128))
    transformed = protonets_learner.transform(image)
    # Black at alpha 128/255 over white: grey 127, ink 128/255 (up to resize rounding).
    assert (transformed - 128 / 255).abs().max() <= 1 / 255


def test_opaque_images_are_unchanged(protonets_learner):
    grey = protonets_learner.transform(stroke_image("L"))
    assert torch.equal(protonets_learner.transform(stroke_image("RGBA")), grey)
    assert torch.equal(protonets_learner.transform(stroke_image("LA")), grey)
    palette = stroke_image("L").convert("P")
    assert "transparency" not in palette.info
    assert torch.equal(protonets_learner.transform(palette), grey)


def test_unusable_modes_are_still_a_clear_error(protonets_learner):
    with pytest.raises(ValueError, match="cannot use a mode 'La' image"):
        protonets_learner.transform(Image.new("La", (105, 105)))


# ------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param([0, 1, 2, 0, 1, 2], id="list"),
        pytest.param((0, 1, 2, 0, 1, 2), id="tuple"),
        pytest.param(torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32), id="int32"),
        pytest.param(torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int16), id="int16"),
        pytest.param(torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int8), id="int8"),
        pytest.param(torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.uint8), id="uint8"),
    ],
)
@pytest.mark.parametrize("algorithm", ["protonets", "reptile"])
def test_labels_as_lists_or_any_integer_tensor(tmp_path, algorithm, labels):
    payload, _ = trainer_like_payload(algorithm)
    save_torch(tmp_path / "model.pt", payload)
    learner = load_learner(tmp_path / "model.pt")
    support_x, _, query_x = task(3, k_shot=1, queries=2)
    support_x = torch.cat([support_x, support_x.flip(-1)])
    torch.manual_seed(5)
    expected = learner.adapt(support_x, torch.tensor([0, 1, 2, 0, 1, 2])).predict(query_x)
    torch.manual_seed(5)
    adapted = learner.adapt(support_x, labels)
    assert adapted.n_way == 3
    torch.testing.assert_close(adapted.predict(query_x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (torch.tensor([0.0, 1.0, 2.0]), r"integer class indices .*got torch\.float32$"),
        (torch.tensor([0, 1, 2], dtype=torch.float64), r"got torch\.float64$"),
        (torch.tensor([False, True, True]), r"got torch\.bool$"),
        ([0, 1.0, 2], r"got support_y\[1\] = 1\.0 \(float\)$"),
        ((0, 1, "2"), r"got support_y\[2\] = '2' \(str\)$"),
        ([0, True, 2], r"got support_y\[1\] = True \(bool\)$"),
        ([0, [1], 2], r"got support_y\[1\] = \[1\] \(list\)$"),
        ("012", r"must be a list/tuple of ints or an integer tensor, got str$"),
    ],
)
def test_non_integer_labels_are_a_clear_error(protonets_learner, labels, expected):
    support_x, _, _ = task(3, k_shot=1)
    with pytest.raises(ValueError, match=expected) as excinfo:
        protonets_learner.adapt(support_x, labels)
    assert one_line_error(excinfo).startswith("support_y must be")


def test_label_lists_get_the_existing_label_checks(protonets_learner):
    support_x, _, _ = task(3, k_shot=1)
    with pytest.raises(ValueError, match="every class present"):
        protonets_learner.adapt(support_x, [0, 2, 2])
    with pytest.raises(ValueError, match="every class present"):
        protonets_learner.adapt(support_x, (-1, 0, 1))
    with pytest.raises(ValueError, match="one label per support image"):
        protonets_learner.adapt(support_x, [0, 1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        protonets_learner.adapt(support_x[:1], [0])
