"""The device and thread settings (`metalab.device`), the process-group backend they pick,
and that a CPU run never touches CUDA, in the train loop and in the stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_training import tiny_params

from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.device import DeviceSettingError, configure, resolve_device, thread_count
from metalab.distributed import DistributedContext, default_backend
from metalab.io import on_cpu
from metalab.learner_api import load_learner
from metalab.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


def fake_gpus(monkeypatch, count: int) -> None:
    """Make torch believe the machine has `count` CUDA devices (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("setting", ["cpu", "CPU", " cpu ", "auto", ""])
def test_cpu_and_auto_without_cuda_give_the_cpu(monkeypatch, setting):
    fake_gpus(monkeypatch, 0)
    assert resolve_device(setting) == torch.device("cpu")
    assert resolve_device(environ={"METALAB_DEVICE": setting}) == torch.device("cpu")
    assert resolve_device(environ={}) == torch.device("cpu")


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_cuda_where_there_is_none_names_cuda_in_one_line(monkeypatch, setting):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(DeviceSettingError) as error:
        resolve_device(setting)
    message = str(error.value)
    assert message.startswith(f"METALAB_DEVICE={setting}: CUDA is not available")
    assert "\n" not in message and "METALAB_DEVICE=cpu" in message


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "cuda:-1", "mps:0"])
def test_unknown_device_names_the_choices(setting):
    with pytest.raises(DeviceSettingError, match="allowed: auto, cpu, cuda or cuda:N"):
        resolve_device(setting)


def test_cuda_picks_the_ranks_own_gpu(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 0)  # more ranks
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    with pytest.raises(DeviceSettingError, match="CUDA device 2 does not exist; .* has 2"):
        resolve_device("cuda:2")


def test_threads_setting(monkeypatch):
    assert thread_count(environ={"METALAB_THREADS": "3"}) == 3
    cores = thread_count(environ={})
    assert cores >= 1
    assert thread_count(processes_on_machine=cores * 2, environ={}) == 1
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(DeviceSettingError, match=f"METALAB_THREADS={bad}: must be"):
            thread_count(environ={"METALAB_THREADS": bad})


def test_backend_is_nccl_only_when_every_rank_has_a_gpu(monkeypatch):
    two_ranks = DistributedContext(rank=0, world_size=2, local_rank=0, local_world_size=2)
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert default_backend(torch.device("cpu"), two_ranks) == "gloo"
    assert default_backend(None, two_ranks) == "gloo"
    assert default_backend(torch.device("cuda", 0), two_ranks) == "cpu:gloo,cuda:nccl"
    fake_gpus(monkeypatch, 1)  # two ranks share one GPU: NCCL cannot
    assert default_backend(torch.device("cuda", 0), two_ranks) == "gloo"


def forbid_cuda(monkeypatch) -> None:
    """A machine with one GPU, where every CUDA entry point a CPU run could reach raises.

    As in torch, the GPU is invisible once ``CUDA_VISIBLE_DEVICES`` is empty (what
    `metalab.device.configure` sets for a CPU run)."""

    def refusing(name: str):
        # One function object per name: torch._dynamo's trace rules map functions to rules.
        def touched(*args, **kwargs):
            raise AssertionError(f"a CPU run touched CUDA (torch.cuda.{name})")

        return touched

    def visible() -> bool:
        return os.environ.get("CUDA_VISIBLE_DEVICES") != ""

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", visible)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(visible()))
    for name in (
        "set_device",
        "synchronize",
        "get_rng_state",
        "set_rng_state",
        "max_memory_allocated",
        "max_memory_reserved",
        "reset_peak_memory_stats",
        "get_device_name",
        "_lazy_init",  # what creates a CUDA context (seeding only queues a lazy call)
    ):
        monkeypatch.setattr(torch.cuda, name, refusing(name))


def test_a_cpu_training_run_and_the_learner_api_never_touch_cuda(
    monkeypatch, tiny_prefetched_28, tmp_path
):
    arrays = load_prefetched(tiny_prefetched_28)
    params = tiny_params(iterations=2, validate_every=1, checkpoint_every=1)
    split = make_split(arrays.character_origin, params.data.split)
    forbid_cuda(monkeypatch)
    threads = torch.get_num_threads()
    device = resolve_device("cpu")
    configure(device, threads)  # as every stage does: hides the GPU from this CPU run
    trainer = Trainer("proto", params, arrays, split, tmp_path, progress=False, device=device)
    trainer.run()
    trainer.save_model(tmp_path / "proto.pt")
    learner = load_learner(tmp_path / "proto.pt", device="cpu")
    support = torch.rand(3, 1, arrays.image_size, arrays.image_size)
    logits = learner.adapt(support, [0, 1, 2]).predict(support)
    assert logits.shape == (3, 3) and logits.device.type == "cpu"


def test_a_cpu_payload_is_saved_as_the_very_same_object():
    # So a CPU run's checkpoints and model files keep their exact bytes.
    tensor = torch.ones(3)
    state = torch.nn.BatchNorm2d(2).state_dict()  # an OrderedDict with _metadata
    payload = {"a": tensor, "b": [tensor, (tensor, 1)], "c": "x", "state": state}
    assert on_cpu(payload) is payload


@pytest.mark.parametrize("setting", ["cuda", "gpu"])
def test_stages_exit_2_in_one_line_for_a_device_this_machine_lacks(tmp_path, setting):
    if torch.cuda.is_available() and setting == "cuda":
        pytest.skip("this machine has CUDA")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "tracking": {"enabled": False},
                "experiments": {"x": {"algorithm": "protonets", "body_init": "src/metalab/models"}},
            }
        )
    )
    shutil.copytree(ROOT / "src" / "metalab" / "models", tmp_path / "src" / "metalab" / "models")
    for stage in ("train.py", "evaluate.py", "pretrain.py"):
        args = [sys.executable, str(ROOT / "stages" / stage)]
        result = subprocess.run(
            args + ([] if stage == "pretrain.py" else ["x"]),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "METALAB_DEVICE": setting},
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (stage, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"error: METALAB_DEVICE={setting}: ")
