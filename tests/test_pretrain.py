"""The pretrain stage's validation curve: held-out drawings disjoint from the training
drawings and only of meta-train characters, curve rows at the planned points, the record's
numbers, the memory format and precision options, and bit-identical reruns."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from metalab.algorithms.pretrain import (
    CURVE_COLUMNS,
    PretrainParams,
    curve_points,
    pretrain_body,
    pretraining_sets,
)
from metalab.data.config import SplitConfig
from metalab.data.prefetch import OmniglotArrays, load_prefetched
from metalab.data.splits import make_split
from metalab.layout import (
    PREFETCHED_FILE,
    PRETRAIN_CURVE_FILE,
    PRETRAIN_METRICS_FILE,
    PRETRAINED_BODY_FILE,
)
from metalab.models import ModelConfig
from metalab.records import PretrainMetrics, info_path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
TINY = ModelConfig(name="conv4", hidden=4)
# The fixture has 20 background and 12 evaluation characters, 20 drawings each.
LAKE = SplitConfig(protocol="lake", validation_characters=5)


@pytest.fixture(scope="module")
def arrays(tiny_prefetched_28) -> OmniglotArrays:
    return load_prefetched(tiny_prefetched_28)


def row_coded(arrays: OmniglotArrays) -> OmniglotArrays:
    """``arrays`` with every image replaced by its row number (pixels [0, 0] and [0, 1])."""
    rows = torch.arange(arrays.images.shape[0])
    images = torch.zeros_like(arrays.images)
    images[:, 0, 0] = (rows // 256).to(torch.uint8)
    images[:, 0, 1] = (rows % 256).to(torch.uint8)
    return dataclasses.replace(arrays, images=images)


def rows_of(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0].long() * 256 + images[:, 0, 1].long()


@pytest.mark.parametrize("held_out, per_class", [(2, None), (3, 4), (1, 20), (0, None)])
def test_held_out_drawings_are_other_drawings_of_the_meta_train_characters(
    arrays, held_out, per_class
):
    coded = row_coded(arrays)
    split = make_split(coded.character_origin, LAKE)
    sets = pretraining_sets(coded, split, held_out, per_class)
    drawings = coded.drawings_per_character
    train_rows, held_rows = rows_of(sets.images), rows_of(sets.validation_images)
    meta_train = set(split.meta_train[:, 0].tolist())

    assert not set(train_rows.tolist()) & set(held_rows.tolist())
    for rows in (train_rows, held_rows):
        assert rows.unique().numel() == rows.numel()
        assert set((rows // drawings).tolist()) <= meta_train
    assert set((train_rows // drawings).tolist()) == meta_train
    # The last `held_out` drawings of every meta-train character, the first ones for training.
    assert held_rows.numel() == len(meta_train) * held_out
    assert set((held_rows % drawings).tolist()) <= set(range(drawings - held_out, drawings))
    per_character = min(per_class or drawings, drawings - held_out)
    assert train_rows.numel() == len(meta_train) * per_character
    assert set((train_rows % drawings).tolist()) == set(range(per_character))
    # One label per character, the same in both sets.
    label_of = dict(zip((train_rows // drawings).tolist(), sets.labels.tolist(), strict=True))
    assert len(set(label_of.values())) == len(meta_train)
    held_characters = (held_rows // drawings).tolist()
    for character, label in zip(held_characters, sets.validation_labels.tolist(), strict=True):
        assert label_of[character] == label


def test_holding_out_every_drawing_is_refused_naming_the_key(arrays):
    split = make_split(arrays.character_origin, LAKE)
    with pytest.raises(ValueError, match=r"^pretrain\.validation_drawings = 20: must be 0 to 19"):
        pretraining_sets(arrays, split, 20)


def test_curve_points_are_evenly_spaced_and_end_each_epoch():
    assert curve_points(10, 4) == {3, 5, 8, 10}
    assert curve_points(10, 1) == {10}
    assert curve_points(3, 5) == {1, 2, 3}  # at most one per batch
    assert curve_points(7, 7) == set(range(1, 8))


def glyph_sets(classes: int = 4, per_class: int = 12, held_out: int = 4):
    """uint8 [N, S, S] glyphs (255 = ink): a fixed random glyph per class, 10% of pixels
    flipped per image; the last `held_out` of each class held out. Class ids arbitrary."""
    generator = torch.Generator().manual_seed(5)
    glyphs = torch.rand(classes, SIZE, SIZE, generator=generator) < 0.3
    flips = torch.rand(classes, per_class, SIZE, SIZE, generator=generator) < 0.1
    images = (glyphs.unsqueeze(1) ^ flips).to(torch.uint8) * 255
    labels = (torch.arange(classes) * 3 + 10).view(-1, 1).expand(-1, per_class)
    kept = per_class - held_out
    return (
        images[:, :kept].flatten(0, 1),
        labels[:, :kept].flatten(),
        images[:, kept:].flatten(0, 1),
        labels[:, kept:].flatten(),
    )


def run_curve(**overrides) -> tuple[dict[str, torch.Tensor], list[tuple[dict, int]]]:
    images, labels, held_images, held_labels = glyph_sets()
    rows: list[tuple[dict, int]] = []
    settings = dict(epochs=3, batch_size=8, lr=0.01, seed=0, progress=False)
    settings.update(evaluations_per_epoch=2, validation_images=held_images)
    settings.update(validation_labels=held_labels, **overrides)
    state = pretrain_body(
        TINY, images, labels, on_log=lambda row, step: rows.append((row, step)), **settings
    )
    return state, rows


def test_curve_rows_at_the_planned_points_with_every_column():
    state, rows = run_curve()  # 32 training images, batches of 8: 4 per epoch
    assert [step for _, step in rows] == [2, 4, 6, 8, 10, 12]
    assert [row["epoch"] for row, _ in rows] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    for row, step in rows:
        assert tuple(row) == CURVE_COLUMNS and row["step"] == step
        assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["validation_accuracy"] <= 1
    # The held-out drawings are measured, not trained on: they improve with training too.
    first, last = rows[0][0], rows[-1][0]
    assert last["validation_loss"] < first["validation_loss"]
    assert last["validation_accuracy"] >= 0.75  # chance is 0.25


def test_rerun_is_bit_identical_and_the_seed_matters():
    state, rows = run_curve()
    again, rows_again = run_curve()
    other, _ = run_curve(seed=1)
    assert rows == rows_again
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["0.0.weight"], other["0.0.weight"])


def test_channels_last_and_bf16_train_the_same_model_differently_rounded():
    _, plain = run_curve(epochs=1)
    state, channels_last = run_curve(epochs=1, channels_last=True)
    assert all(value.is_contiguous() for value in state.values())  # stored as NCHW
    with pytest.warns(UserWarning, match="no native bf16") if _emulated_bf16() else _nothing():
        _, bf16 = run_curve(epochs=1, precision="bf16")
    first = plain[0][0]["loss"]
    assert channels_last[0][0]["loss"] == pytest.approx(first, rel=1e-4)
    assert bf16[0][0]["loss"] == pytest.approx(first, rel=3e-2)
    assert bf16[0][0]["loss"] != first  # the forward really ran in bf16


def _emulated_bf16() -> bool:
    from metalab.algorithms.precision import cpu_has_native_bf16

    return cpu_has_native_bf16() is False


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_validation_classes_must_be_training_classes():
    images, labels, held_images, held_labels = glyph_sets()
    with pytest.raises(ValueError, match="classes the training images lack"):
        pretrain_body(
            TINY,
            images,
            labels,
            epochs=1,
            batch_size=8,
            lr=0.01,
            seed=0,
            progress=False,
            validation_images=held_images,
            validation_labels=held_labels + 1,
        )


def load_stage():
    spec = importlib.util.spec_from_file_location("stage_pretrain", ROOT / "stages" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(directory: Path, tiny_prefetched_28: Path, monkeypatch) -> dict[str, bytes]:
    (directory / PREFETCHED_FILE).parent.mkdir(parents=True)
    shutil.copy(tiny_prefetched_28, directory / PREFETCHED_FILE)
    params = PretrainParams.model_validate(
        {
            "data": {"split": LAKE.model_dump()},
            "pretrain": {
                "model": TINY.model_dump(),
                "epochs": 2,
                "batch_size": 64,
                "validation_drawings": 2,
                "evaluations_per_epoch": 2,
                "threads": 1,
            },
            "tracking": {"enabled": False},
        }
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the stage sets it; restored after
    monkeypatch.chdir(directory)
    load_stage().main(argparse.Namespace(no_progress=True), params)
    monkeypatch.chdir(ROOT)
    files = (PRETRAINED_BODY_FILE, PRETRAIN_CURVE_FILE, PRETRAIN_METRICS_FILE)
    return {str(path): (directory / path).read_bytes() for path in files}


def test_stage_writes_the_curve_and_a_numeric_record_and_reruns_identically(
    tiny_prefetched_28, tmp_path, monkeypatch
):
    first = run_stage(tmp_path / "a", tiny_prefetched_28, monkeypatch)
    second = run_stage(tmp_path / "b", tiny_prefetched_28, monkeypatch)

    # 15 meta-train characters x 18 drawings = 270 images: 5 batches of 64 per epoch.
    curve = pd.read_csv(tmp_path / "a" / PRETRAIN_CURVE_FILE)
    assert list(curve.columns) == list(CURVE_COLUMNS)
    assert curve["step"].tolist() == [3, 5, 8, 10]
    assert curve["epoch"].tolist() == [0.6, 1.0, 1.6, 2.0]
    assert curve.notna().all().all()

    metrics = json.loads((tmp_path / "a" / PRETRAIN_METRICS_FILE).read_text())
    leaves = [metrics[k] for k in metrics if k != "validation_accuracy_by_epoch"]
    leaves += list(metrics["validation_accuracy_by_epoch"].values())
    assert all(isinstance(v, int | float) and not isinstance(v, str) for v in leaves)
    record = PretrainMetrics.read(tmp_path / "a" / PRETRAIN_METRICS_FILE)
    assert (record.characters, record.training_images, record.validation_images) == (15, 270, 30)
    assert (record.epochs, record.steps, record.model, record.precision) == (2, 10, "conv4", "fp32")
    assert record.final_validation_accuracy == curve["validation_accuracy"].iloc[-1]
    assert record.best_validation_accuracy == curve["validation_accuracy"].max()
    assert record.validation_accuracy_by_epoch == {
        "1": curve["validation_accuracy"].iloc[1],
        "2": curve["validation_accuracy"].iloc[3],
    }
    info = json.loads(info_path(tmp_path / "a" / PRETRAIN_METRICS_FILE).read_text())
    assert info["model"] == "conv4" and info["device"] == "cpu"

    # A rerun: the same body and curve bit for bit; only the cost figures differ.
    assert first[str(PRETRAINED_BODY_FILE)] == second[str(PRETRAINED_BODY_FILE)]
    assert first[str(PRETRAIN_CURVE_FILE)] == second[str(PRETRAIN_CURVE_FILE)]
    timing = {"training_seconds", "images_per_s", "peak_memory_mb"}
    again = json.loads(second[str(PRETRAIN_METRICS_FILE)])
    assert {k: v for k, v in metrics.items() if k not in timing} == {
        k: v for k, v in again.items() if k not in timing
    }
