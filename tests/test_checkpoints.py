"""Checkpoints belong to their exact inputs, hold only finite values, and no loader runs
code from a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_training import tiny_params

import metalab.training
from metalab.algorithms.base import StepStats
from metalab.checkpoints import Checkpoint, non_finite_entries, source_digest
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.errors import DivergedError, MetalabError
from metalab.learner_api import ModelFileError, load_learner
from metalab.models.config import ModelConfig
from metalab.models.factory import build_model
from metalab.models.pretrained import load_body_init
from metalab.params import validate_params
from metalab.rl.loop import load_agent
from metalab.training import Trainer


@pytest.fixture
def data(tiny_prefetched_28):
    arrays = load_prefetched(tiny_prefetched_28)
    params = tiny_params()
    return arrays, make_split(arrays.character_origin, params.data.split)


def finished(data, directory: Path, params=None) -> Trainer:
    arrays, split = data
    trainer = Trainer("proto", params or tiny_params(iterations=2), arrays, split, directory, False)
    trainer.run()
    return trainer


# ------------------------------------------------------------------------- identity
def test_checkpoint_round_trip_and_other_fingerprint_is_set_aside(tmp_path, capsys):
    path = tmp_path / "run.pt"
    Checkpoint(path, "a").save({"iteration": 3, "weights": torch.ones(2)})
    assert Checkpoint(path, "a").load()["iteration"] == 3
    assert Checkpoint(path, "b").load() is None
    assert not path.exists() and (tmp_path / "run.pt.stale").exists()
    assert "set aside as" in capsys.readouterr().out
    # the set-aside file is the original, untouched
    assert torch.load(tmp_path / "run.pt.stale", weights_only=True)["fingerprint"] == "a"


def test_unreadable_checkpoint_is_set_aside_and_training_starts_afresh(data, tmp_path, capsys):
    trainer = finished(data, tmp_path)
    path = trainer.checkpoint.path
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash
    arrays, split = data
    again = Trainer("proto", tiny_params(iterations=2), arrays, split, tmp_path, False)
    assert not again.try_resume() and again.iteration == 0
    assert "unreadable" in capsys.readouterr().out
    assert path.with_name("proto.pt.stale").exists()


def test_finished_checkpoint_is_not_resumed_when_the_data_changes(data, tmp_path):
    finished(data, tmp_path)
    arrays, split = data
    arrays.images[0, 0, 0] ^= 255  # one pixel of the prefetched images
    again = Trainer("proto", tiny_params(iterations=2), arrays, split, tmp_path, False)
    assert not again.try_resume()


def test_finished_checkpoint_is_not_resumed_when_the_code_changes(data, tmp_path, monkeypatch):
    finished(data, tmp_path)
    arrays, split = data
    same = Trainer("proto", tiny_params(iterations=2), arrays, split, tmp_path, False)
    assert same.try_resume() and same.iteration == 2  # same inputs: resumed
    monkeypatch.setattr(metalab.training, "source_digest", lambda: "patched " + source_digest())
    changed = Trainer("proto", tiny_params(iterations=2), arrays, split, tmp_path, False)
    assert not changed.try_resume()


def anil_params(body: Path) -> object:
    return validate_params(
        {
            "data": {"split": {"validation_characters": 5}},
            "train": tiny_params(
                iterations=2, validate_every=2, validation_episodes=2, checkpoint_every=1
            ).train.model_dump(),
            "experiments": {
                "anil": {
                    "algorithm": "maml",
                    "model": {"hidden": 8},
                    "body_init": str(body),
                    "options": {"adapt_parameters": "head", "test_inner_steps": 1},
                }
            },
        }
    )


def test_finished_checkpoint_is_not_resumed_when_the_pretrained_body_changes(data, tmp_path):
    """The failure this guards against: a new pretrained body (e.g. another pretrain.seed)
    'resumed' the finished checkpoint trained on the old one."""
    arrays, split = data
    body = tmp_path / "body.pt"
    torch.manual_seed(1)
    torch.save(build_model(ModelConfig(hidden=8), 3, arrays.image_size).state_dict(), body)
    Trainer("anil", anil_params(body), arrays, split, tmp_path, False).run()
    assert Trainer("anil", anil_params(body), arrays, split, tmp_path, False).try_resume()
    torch.manual_seed(2)
    torch.save(build_model(ModelConfig(hidden=8), 3, arrays.image_size).state_dict(), body)
    assert not Trainer("anil", anil_params(body), arrays, split, tmp_path, False).try_resume()


# ----------------------------------------------------------------------- divergence
def diverging(trainer: Trainer, at: int, make_bad) -> None:
    real = trainer.learner.meta_gradients

    def meta_gradients(episodes, progress):
        stats = real(episodes, progress)
        return make_bad(stats) if progress.iteration == at else stats

    trainer.learner.meta_gradients = meta_gradients


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_loss_stops_before_the_step(data, tmp_path, value):
    arrays, split = data
    trainer = Trainer("proto", tiny_params(), arrays, split, tmp_path, progress=False)
    diverging(trainer, 3, lambda stats: StepStats(value, stats.accuracy))
    with pytest.raises(DivergedError, match=f"meta-loss = {value} at iteration 3"):
        trainer.run()


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_gradient_with_a_finite_loss_stops_before_the_step(data, tmp_path, value):
    arrays, split = data
    trainer = Trainer("proto", tiny_params(), arrays, split, tmp_path, progress=False)
    parameter = next(trainer.learner.parameters())

    def poison(stats):
        parameter.grad[0] = value
        return stats

    diverging(trainer, 3, poison)
    with pytest.raises(DivergedError, match="gradient of .* at iteration 3; stopped before"):
        trainer.run()
    assert bool(torch.isfinite(parameter).all())  # the step was not taken
    saved = torch.load(tmp_path / "proto.pt", weights_only=True)["state"]
    assert saved["iteration"] == 2 and non_finite_entries(saved) == []


def test_a_state_with_non_finite_values_is_never_written(tmp_path):
    path = tmp_path / "run.pt"
    Checkpoint(path, "a").save({"w": torch.ones(2)})
    with pytest.raises(MetalabError, match=r"non-finite values in best\.w"):
        Checkpoint(path, "a").save({"best": {"w": torch.tensor([1.0, float("inf")])}})
    assert torch.equal(Checkpoint(path, "a").load()["w"], torch.ones(2))  # the old one stays


# ------------------------------------------------------------------ crafted files
class RunsCode:
    """Unpickling this runs a shell command (what a crafted file can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pt"
    payload = {"fingerprint": "x", "state": RunsCode(marker), "format": 1, "agent": {}}
    torch.save(payload, path)
    # The file is what it claims: an unrestricted load runs its code.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_no_loader_runs_code_from_a_file(crafted, tmp_path):
    path, marker = crafted
    assert Checkpoint(path, "x").load() is None  # set aside as unreadable
    path = path.with_name("crafted.pt.stale").replace(path)
    with pytest.raises(ModelFileError):
        load_learner(path)
    with pytest.raises(MetalabError, match="not a metalab RL model"):
        load_agent(path)
    with pytest.raises(ValueError, match="not a weights file"):
        load_body_init(build_model(ModelConfig(hidden=8), 3, 28), str(path))
    assert not marker.exists()
