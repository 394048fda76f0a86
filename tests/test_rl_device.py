"""The meta-RL track computes on a chosen device.

This machine may have no GPU, so most tests run the RL code on a stand-in device:
`OnStandInDevice` tensors say they live on ``meta`` but carry real CPU values, and
`StandInDevice` (a dispatch mode) computes every op on those values. A tensor that the RL
code creates without a device is an ordinary CPU tensor there, and the first op that mixes
it with stand-in tensors fails, as it would on a GPU. Since the values are computed on the
CPU, a stand-in run must give exactly the numbers of a CPU run. `DevicelessFactoryCalls`
adds the direct check: no factory call written in ``metalab.rl`` leaves the device out.
The CUDA test compares a CPU and a GPU iteration where there is a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import metalab.rl
from metalab.device import DeviceSettingError
from metalab.records import RLEvaluationMetrics, RLTrainSummary
from metalab.rl import RLExperimentConfig, RLTrainer, evaluate_rl
from metalab.rl.config import RLParams, load_rl_params
from metalab.rl.loop import load_agent, save_agent
from metalab.tracking import run_tags

ROOT = Path(__file__).resolve().parents[1]
RL_SOURCE = Path(metalab.rl.__file__).resolve().parent

STAND_IN = torch.device("meta")
CPU = torch.device("cpu")
# Ops that legitimately take tensors of two devices: copies between them.
_CROSS_DEVICE_OPS = {"_to_copy", "copy_"}


class DeviceMixError(RuntimeError):
    """An op got stand-in tensors together with a (non-scalar) CPU tensor."""


class OnStandInDevice(torch.Tensor):
    """A tensor that reports ``device == STAND_IN`` and holds real CPU values (``cpu_values``)."""

    cpu_values: torch.Tensor

    @staticmethod
    def __new__(cls, cpu_values: torch.Tensor) -> OnStandInDevice:
        tensor = torch.Tensor._make_wrapper_subclass(
            cls,
            cpu_values.shape,
            strides=cpu_values.stride(),
            storage_offset=cpu_values.storage_offset(),
            dtype=cpu_values.dtype,
            layout=cpu_values.layout,
            device=STAND_IN,
            requires_grad=False,
        )
        tensor.cpu_values = cpu_values
        return tensor

    # The values are real: ``load_state_dict`` must copy into these parameters rather than
    # skip them as it skips real meta tensors.
    @property
    def is_meta(self) -> bool:
        return False

    def tolist(self) -> list:
        return self.cpu_values.tolist()

    def __repr__(self) -> str:
        return f"OnStandInDevice({self.cpu_values!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _on_stand_in(func, args, kwargs or {})


def _on_stand_in(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on CPU values; results of ops on the stand-in device are stand-ins."""
    leaves, _ = tree_flatten((args, kwargs))
    stand_ins = [leaf for leaf in leaves if isinstance(leaf, OnStandInDevice)]
    name = func.overloadpacket.__name__
    if stand_ins and name not in _CROSS_DEVICE_OPS:
        # Like CUDA: CPU scalars (0-dim) may join device tensors, nothing larger.
        cpu = [
            tuple(leaf.shape)
            for leaf in leaves
            if isinstance(leaf, torch.Tensor)
            and not isinstance(leaf, OnStandInDevice)
            and leaf.dim() > 0
        ]
        if cpu:
            raise DeviceMixError(f"{func} got {STAND_IN} tensors and CPU tensors of shapes {cpu}")
    target = kwargs.get("device")
    if not stand_ins and target != STAND_IN:
        return func(*args, **kwargs)
    cpu_args, cpu_kwargs = tree_map(
        lambda leaf: leaf.cpu_values if isinstance(leaf, OnStandInDevice) else leaf,
        (args, kwargs),
    )
    if target == STAND_IN:
        cpu_kwargs["device"] = CPU
    result = func(*cpu_args, **cpu_kwargs)
    if name == "copy_":
        return args[0]
    if name == "_to_copy":
        to_stand_in = target == STAND_IN or (
            target is None and isinstance(args[0], OnStandInDevice)
        )
    else:
        to_stand_in = True
    # In-place ops return their input: hand back the same stand-in object.
    inputs = {id(tensor.cpu_values): tensor for tensor in stand_ins}

    def wrap(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in inputs:
            return inputs[id(value)]
        return OnStandInDevice(value) if to_stand_in else value

    return tree_map(wrap, result)


class StandInDevice(TorchDispatchMode):
    """Inside: ``device=STAND_IN`` creates stand-in tensors and every op computes on CPU
    values; mixing stand-in and CPU tensors raises `DeviceMixError`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _on_stand_in(func, args, kwargs or {})


# torch functions that make a tensor from sizes or data (the *_like and new_* ones follow
# their input's device, so they cannot forget it).
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
    torch.empty_strided,
}


class DevicelessFactoryCalls(TorchFunctionMode):
    """Records every factory call written in a file under ``directory`` that gives no
    ``device`` (``calls``: "file:line function"). Only the immediate caller counts, so
    torch's own internals (an optimizer's step counter, for one) are not reported."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).resolve()
            if path.is_relative_to(self.directory):
                self.calls.append(f"{path.name}:{caller.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def _tiny(**overrides: Any) -> RLExperimentConfig:
    settings = dict(
        iterations=2,
        meta_batch_size=3,
        trajectories_per_task=4,
        horizon=8,
        hidden_size=8,
        eval_tasks=3,
        eval_adaptation_steps=[1],
        seed=7,
    )
    settings.update(overrides)
    return RLExperimentConfig(**settings)


# Every learner, both baselines (the MLP critic with actor-critic GAE), both environments.
VARIANTS = {
    "maml_navigation_linear": dict(algorithm="maml_rl"),
    "anil_navigation_mlp_critic": dict(
        algorithm="anil_rl",
        baseline="mlp",
        critic_fit_steps=2,
        critic_hidden_size=8,
        gae_lambda=0.9,
    ),
    "reptile_bandit": dict(algorithm="reptile_rl", env="bernoulli_bandit", reptile_inner_steps=2),
}


def _without_timing(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if key != "tasks_per_second"}


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _assert_same_tensors(
    first: dict, second: dict, compare: Callable[[torch.Tensor, torch.Tensor], bool]
) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert compare(first[name], second[name]), name


def _assert_cpu_state(state: Any) -> None:
    """Every tensor is an ordinary CPU tensor (what a portable file needs)."""
    for tensor in _tensors(state):
        assert type(tensor) is torch.Tensor and tensor.device == CPU, type(tensor)


def _file_round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_training_and_evaluation_compute_on_the_chosen_device(overrides):
    config = _tiny(**overrides)
    reference = RLTrainer(config)
    expected = reference.run_iteration()
    expected_evaluation = evaluate_rl(config, reference.agent_state())

    with StandInDevice():
        trainer = RLTrainer(config, device=STAND_IN)
        tasks = trainer.env.sample_tasks(2, torch.Generator().manual_seed(0))
        assert tasks.device == STAND_IN
        metrics = trainer.run_iteration()
        agent = trainer.agent_state()
        state = trainer.state_dict()
        evaluation = evaluate_rl(config, agent, device=STAND_IN)

    assert all(parameter.device == STAND_IN for parameter in trainer.policy.parameters())
    if config.baseline == "mlp":
        assert all(p.device == STAND_IN for p in trainer.baseline.critic.parameters())
    _assert_cpu_state(agent)
    _assert_cpu_state(state)
    # Same ops on the same values and the same CPU random streams: the CPU run's numbers.
    assert _without_timing(metrics) == _without_timing(expected)
    _assert_same_tensors(state["policy"], reference.state_dict()["policy"], torch.equal)
    assert evaluation == expected_evaluation


def test_saved_states_hold_cpu_tensors_and_resume_on_another_device(tmp_path):
    config = _tiny(**VARIANTS["anil_navigation_mlp_critic"])
    uninterrupted = RLTrainer(config)
    uninterrupted.run_iteration()
    uninterrupted.run_iteration()

    with StandInDevice():
        on_device = RLTrainer(config, device=STAND_IN)
        on_device.run_iteration()
        saved = _file_round_trip(on_device.state_dict())
        # Live device tensors (not a snapshot) still reach the model file as CPU tensors.
        live = {
            "policy": on_device.policy.state_dict(),
            "baseline": on_device.baseline.state_dict(),
        }
        save_agent(tmp_path / "agent.pt", config, live)
    _assert_cpu_state(load_agent(tmp_path / "agent.pt"))
    resumed_on_cpu = RLTrainer(config)
    resumed_on_cpu.load_state_dict(saved)
    resumed_on_cpu.run_iteration()

    cpu_saved = RLTrainer(config)
    cpu_saved.run_iteration()
    with StandInDevice():
        resumed_on_device = RLTrainer(config, device=STAND_IN)
        resumed_on_device.load_state_dict(_file_round_trip(cpu_saved.state_dict()))
        resumed_on_device.run_iteration()
        final_on_device = resumed_on_device.state_dict()

    expected = uninterrupted.state_dict()
    for final in (resumed_on_cpu.state_dict(), final_on_device):
        _assert_same_tensors(final["policy"], expected["policy"], torch.equal)
        _assert_same_tensors(
            final["baseline"]["critic"], expected["baseline"]["critic"], torch.equal
        )
        assert [_without_timing(row) for row in final["history"]] == [
            _without_timing(row) for row in expected["history"]
        ]


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_no_factory_call_in_the_rl_code_leaves_out_the_device(overrides):
    config = _tiny(**overrides)
    with DevicelessFactoryCalls(RL_SOURCE) as recorder:
        trainer = RLTrainer(config)
        trainer.run_iteration()
        trainer.load_state_dict(trainer.state_dict())
        evaluate_rl(config, trainer.agent_state())
    assert recorder.calls == []


def test_the_device_checks_catch_what_they_are_for():
    """Neither check is vacuous: each flags the mistake it looks for."""
    with StandInDevice():
        on_device = torch.ones(3, device=STAND_IN)
        assert isinstance(on_device, OnStandInDevice) and on_device.device == STAND_IN
        assert float((on_device * 2).sum()) == 6.0
        assert (on_device + torch.tensor(1.0)).device == STAND_IN  # a CPU scalar may join
        with pytest.raises(DeviceMixError):
            _ = on_device + torch.zeros(3)
    here = Path(__file__).resolve().parent
    with DevicelessFactoryCalls(here) as recorder:
        torch.zeros(2, device=CPU)
        torch.arange(3)
    assert len(recorder.calls) == 1 and recorder.calls[0].endswith(" arange")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_cuda_iteration_matches_a_cpu_iteration(overrides):
    config = _tiny(**overrides)
    cuda = torch.device("cuda")
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both, as `configure` sets it
    try:
        on_cpu, on_cuda = RLTrainer(config), RLTrainer(config, device=cuda)
        assert next(on_cuda.policy.parameters()).device.type == "cuda"
        cpu_metrics, cuda_metrics = on_cpu.run_iteration(), on_cuda.run_iteration()
        cuda_state = on_cuda.state_dict()
        cpu_evaluation = evaluate_rl(config, on_cpu.agent_state())
        cuda_evaluation = evaluate_rl(config, on_cuda.agent_state(), device=cuda)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    _assert_cpu_state(cuda_state)
    for name, value in _without_timing(cpu_metrics).items():
        assert cuda_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    _assert_same_tensors(
        cuda_state["policy"],
        on_cpu.state_dict()["policy"],
        lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5),
    )
    for name, value in cpu_evaluation["metrics"].items():
        assert cuda_evaluation["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def _load_stage(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project(directory: Path, monkeypatch: pytest.MonkeyPatch) -> RLParams:
    """A scratch project (cwd) with one tiny RL experiment ``nav``, tracking off."""
    tiny = dict(iterations=1, meta_batch_size=2, trajectories_per_task=2, horizon=5)
    experiment = {**tiny, "hidden_size": 4, "eval_tasks": 2, "eval_adaptation_steps": [1]}
    params = {"tracking": {"enabled": False}, "rl_experiments": {"nav": experiment}}
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(directory)
    return load_rl_params(directory / "params.yaml")


def _stage_args() -> argparse.Namespace:
    return argparse.Namespace(experiment="nav", seed=None, checkpoint_every=0, no_progress=True)


def _run_stage_recording_tags(
    stage: str, params: RLParams, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Run ``stages/<stage>.py``'s main in this process; the MLflow tags its run gets."""
    module = _load_stage(stage)
    tags: dict[str, Any] = {}
    real_stage_run = module.stage_run

    def recording_stage_run(*args: Any, **kwargs: Any) -> Any:
        tags.update(run_tags(args[0], kwargs["tags"], kwargs["device"]))
        return real_stage_run(*args, **kwargs)

    monkeypatch.setattr(module, "stage_run", recording_stage_run)
    module.main(_stage_args(), params)
    return tags


def test_the_rl_stages_record_where_they_computed(tmp_path, monkeypatch):
    params = _project(tmp_path, monkeypatch)
    monkeypatch.setenv("METALAB_DEVICE", "cpu")
    monkeypatch.setenv("METALAB_THREADS", "2")  # not used: num_threads is the param
    for stage, schema, written in (
        ("train_rl", RLTrainSummary, tmp_path / "metrics" / "train_rl" / "nav.json"),
        ("evaluate_rl", RLEvaluationMetrics, tmp_path / "metrics" / "eval_rl" / "nav.json"),
    ):
        tags = _run_stage_recording_tags(stage, params, monkeypatch)
        assert tags["stage_kind"] == stage and tags["experiment"] == "nav"
        assert tags["device"] == "cpu" and tags["threads"] == "1"
        assert tags["torch_version"] == torch.__version__ and tags["device_name"]
        record = schema.read(written).to_dict()  # the numbers and the text beside them
        assert "device" not in json.loads(written.read_text())  # text: in the info file
        assert record["device"] == "cpu" and record["threads"] == 1
        assert record["torch_version"] == torch.__version__ and record["peak_memory_mb"] > 0
        assert "gpu_peak_allocated_mb" not in record


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("stage", ["train_rl", "evaluate_rl"])
def test_asking_for_a_missing_cuda_device_stops_the_stage_before_it_starts(
    stage, tmp_path, monkeypatch
):
    params = _project(tmp_path, monkeypatch)
    monkeypatch.setenv("METALAB_DEVICE", "cuda")
    module = _load_stage(stage)
    with pytest.raises(DeviceSettingError, match="CUDA"):  # a ParamsError: exit 2, one line
        module.main(_stage_args(), params)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
