"""Tracking and the device a stage computes on: memory figures from the device that did the
work (host peak RSS always, a CUDA device's allocator peaks only for a CUDA device), device
tags, a CPU run that never touches CUDA, and MLflow's system metrics during a run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from metalab.runtime import cpu_model
from metalab.schema import TrackingConfig
from metalab.tracking import memory_figures, peak_memory_mb, stage_run

UNIT = TrackingConfig(experiment_name="unit")
CPU = torch.device("cpu")
GPU_FIGURES = {"gpu_peak_allocated_mb", "gpu_peak_reserved_mb"}
CUDA_ENTRY_POINTS = (
    "is_available",
    "device_count",
    "init",
    "_lazy_init",
    "current_device",
    "get_device_name",
    "get_device_properties",
    "reset_peak_memory_stats",
    "max_memory_allocated",
    "max_memory_reserved",
    "memory_allocated",
    "synchronize",
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", raising=False)
    return uri


@pytest.fixture
def cuda_forbidden(monkeypatch):
    """Every torch.cuda entry point a tracking bug could call raises (as if the machine had
    a GPU whose use by a CPU run is the bug)."""

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"a CPU run called torch.cuda.{name}")

        return call

    for name in CUDA_ENTRY_POINTS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda answering for one GPU with fixed allocator peaks (3 MB allocated, 5 MB
    reserved); returns the devices `reset_peak_memory_stats` was called with."""
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**20)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    return resets


def finished_run(store, run_id):
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    return run


# ---------------------------------------------------------------- memory figures and tags


def test_cpu_run_records_host_rss_no_gpu_figures_and_cpu_tags(store):
    with stage_run("train@maml", {}, UNIT, device=CPU) as run:
        torch.ones(256, 256) @ torch.ones(256, 256)
    run_data = finished_run(store, run.run_id).data
    metrics, tags = run_data.metrics, run_data.tags
    assert not GPU_FIGURES & set(metrics)
    assert metrics["peak_memory_mb"] > 100  # torch alone takes more: host RSS, never 0
    assert metrics["peak_memory_mb"] == pytest.approx(peak_memory_mb(), rel=0.05)
    assert tags["device"] == "cpu" and tags["device_name"] == cpu_model()
    assert tags["threads"] == str(torch.get_num_threads())
    assert tags["torch_version"] == torch.__version__
    assert tags.get("cuda_version") == torch.version.cuda  # absent for a CPU build of torch


def test_memory_figures_are_host_rss_on_cpu_and_without_a_device():
    for device in (CPU, None):
        figures = memory_figures(device)
        assert set(figures) == {"peak_memory_mb"}
        assert figures["peak_memory_mb"] == pytest.approx(peak_memory_mb(), rel=0.05)


def test_stage_without_a_device_is_tagged_with_the_cpu(store):
    with stage_run("download", {}, UNIT) as run:
        pass
    tags = finished_run(store, run.run_id).data.tags
    assert tags["device"] == "cpu" and tags["device_name"] == cpu_model()
    assert "torch_version" not in tags  # no torch device: nothing about torch recorded


def test_cpu_run_never_touches_cuda(store, cuda_forbidden):
    """Even where CUDA would be available: a CPU stage (tracked, system metrics on) and a
    stage without a device call nothing of torch.cuda."""
    with stage_run("evaluate@maml", {}, UNIT, device=CPU, system_metrics=True) as run:
        run.log_metrics({"accuracy": 0.5})
        assert set(memory_figures(CPU)) == {"peak_memory_mb"}
    with stage_run("report", {}, UNIT) as other:
        pass
    with stage_run("train@maml", {}, UNIT, enabled=False, device=CPU) as untracked:
        pass
    assert set(untracked.meter.figures()) == {"wall_time_s", "peak_memory_mb"}
    for run_id in (run.run_id, other.run_id):
        metrics = finished_run(store, run_id).data.metrics
        assert "peak_memory_mb" in metrics and not GPU_FIGURES & set(metrics)


def test_fresh_process_download_imports_no_torch_and_cpu_run_leaves_cuda_uninitialised(
    tmp_path,
):
    """In a process of its own: download's stage_run (no device, tracked, system metrics on)
    keeps torch out of the process; a CPU stage's run leaves CUDA uninitialised."""
    script = textwrap.dedent(
        """
        import sys
        from metalab.schema import TrackingConfig
        from metalab.tracking import memory_figures, stage_run

        tracking = TrackingConfig(experiment_name="unit")
        with stage_run("download", {}, tracking, system_metrics=True) as run:
            run.meter.add_tasks(1)
        print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))

        import torch

        cpu = torch.device("cpu")
        with stage_run("train@maml", {}, tracking, device=cpu, system_metrics=True):
            torch.ones(3) @ torch.ones(3)
        memory_figures(cpu)
        print(torch.cuda.is_initialized())
        """
    )
    result = run_script(script, tmp_path)
    assert result.stdout.strip().splitlines()[-2:] == ["[]", "False"], result.stdout


def run_script(script: str, tmp_path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_cuda_run_resets_and_records_that_devices_peaks(store, fake_gpu):
    device = torch.device("cuda", 0)
    with stage_run("train@maml", {}, UNIT, device=device) as run:
        assert fake_gpu == [device]  # reset when the run starts, before the stage's work
    assert fake_gpu == [device]
    run_data = finished_run(store, run.run_id).data
    metrics, tags = run_data.metrics, run_data.tags
    assert metrics["gpu_peak_allocated_mb"] == 3.0 and metrics["gpu_peak_reserved_mb"] == 5.0
    assert metrics["peak_memory_mb"] == pytest.approx(peak_memory_mb(), rel=0.05)  # host RSS
    assert tags["device"] == "cuda:0" and tags["device_name"] == "Fake GPU 80GB"
    assert tags["cuda_version"] == "12.8" and tags["torch_version"] == torch.__version__
    figures = memory_figures(device)
    assert figures["gpu_peak_allocated_mb"] == 3.0 and figures["gpu_peak_reserved_mb"] == 5.0
    assert figures["peak_memory_mb"] == pytest.approx(peak_memory_mb(), rel=0.05)


def test_untracked_cuda_run_still_resets_and_measures_its_device(tmp_path, fake_gpu):
    device = torch.device("cuda", 1)
    with stage_run("train@maml", {}, UNIT, enabled=False, device=device) as run:
        pass
    assert fake_gpu == [device] and run.run_id is None
    assert GPU_FIGURES <= set(run.meter.figures())


# ---------------------------------------------------------------- system metrics


def system_metrics_of(store, run_id) -> set[str]:
    return {key for key in MlflowClient(store).get_run(run_id).data.metrics if "system/" in key}


def test_system_metrics_are_logged_during_the_run(store, monkeypatch):
    monkeypatch.setattr("metalab.tracking.SYSTEM_METRICS_INTERVAL_S", 0.2)
    with stage_run("train@maml", {}, UNIT, device=CPU, system_metrics=True) as run:
        deadline = time.monotonic() + 20
        while not system_metrics_of(store, run.run_id) and time.monotonic() < deadline:
            time.sleep(0.2)
    finished_run(store, run.run_id)
    logged = system_metrics_of(store, run.run_id)
    assert "system/cpu_utilization_percentage" in logged, logged
    assert "system/system_memory_usage_megabytes" in logged
    assert not any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())


def test_system_metrics_are_off_unless_asked_for(store, monkeypatch):
    monkeypatch.setattr("metalab.tracking.SYSTEM_METRICS_INTERVAL_S", 0.1)
    with stage_run("train@maml", {}, UNIT, device=CPU) as run:
        time.sleep(0.5)
    assert not system_metrics_of(store, run.run_id)


def test_a_monitor_that_cannot_start_only_warns(store, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no psutil here")

    monkeypatch.setattr("mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor", broken)
    with stage_run("train@maml", {}, UNIT, device=CPU, system_metrics=True) as run:
        run.log_metrics({"loss": 1.0}, step=1)
    assert finished_run(store, run.run_id).data.metrics["loss"] == 1.0
    assert "could not start the MLflow system metrics monitor: no psutil here" in caplog.text


def test_system_metrics_with_tracking_disabled_do_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    with stage_run("train@maml", {}, UNIT, enabled=False, device=CPU, system_metrics=True) as run:
        assert not any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())
    assert run.run_id is None and not (tmp_path / "never.db").exists()
