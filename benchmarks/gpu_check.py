"""Accept metalab's GPU path with one command: every stage on the device, what MLflow
recorded about it, and MAML throughput behind float64 meta-gradient checks.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--output PATH] [--keep]

Needs nothing but a checkout with metalab's dependencies: it builds tiny Omniglot-shaped
archives and a throwaway project in a temporary directory, and runs there:

1. Stages: download (from the local archives), prefetch, episodes, pretrain, then train
   and evaluate one tiny experiment of every learner family (MAML, FOMAML, MAML++,
   Meta-SGD, ANIL from scratch and from the pretrained body, TAML entropy, Reptile, CAVIA,
   ProtoNets, ProtoNets with task dropout, generated head weights, LEO) and train_rl/evaluate_rl of
   one MAML-RL run, each as the real stage script with ``METALAB_DEVICE=<device>`` and an
   MLflow store of its own. A row passes when the stage exits 0 and its metrics file says
   it ran on the device (``device``) and, on CUDA, used GPU memory
   (``gpu_peak_allocated_mb`` > 0). A stage whose input failed is skipped (and fails).
2. MLflow: every run of a stage that computes on the device (pretrain, train, evaluate,
   train_rl, evaluate_rl) finished, is tagged with the device, has ``wall_time_s`` and
   ``tasks_per_s`` and, on CUDA, ``gpu_peak_allocated_mb`` > 0. Train and evaluate runs,
   which sample the machine, must carry ``system/gpu_*`` metrics on CUDA (skipped without
   nvidia-ml-py) and ``system/*`` ones on the CPU: the monitor samples every 0.2 s here
   (10 s in a stage's own default), a run shorter than 1 s may end before its first sample
   and is skipped, but at least one run must have samples.
3. Throughput: MAML, 5-way 1-shot, 15 queries per class, Conv4 (64 channels, max-pooling)
   on 28x28 images, second order, one inner step, as three variants: ``loop`` (the plain
   per-task loop, ``vectorise_tasks: false``), ``vectorised`` (the default fast path) and
   ``vmap`` (``torch.func``: the inner loop as a function of a parameter dict, vmapped over
   chunks of --vmap-chunk tasks, with a BatchNorm written in plain tensor ops, since vmap's
   batching of the built-in BatchNorm's double backward gives wrong meta-gradients). Each
   variant must first match the per-task loop's meta-gradient (the loop run on the CPU)
   in float64 on the device within rtol 1e-6; one that does not is reported and not
   timed. The rest are timed in fp32 and bf16 (autocast; skipped on a GPU without bf16)
   at 32 and 128 tasks per meta-batch (--quick: 8), each in its own process: 2 warmup
   iterations, then 5 timed ones (--quick: 1 and 2; after 30 s of either kind no more
   than one, which only a CPU reaches), reporting tasks/s, the ratio to the loop in fp32
   at the same meta-batch size, and peak memory (CUDA allocator peak of the timed
   iterations on a GPU, peak RSS of the process on the CPU).

Prints the tables, writes them to benchmarks/results/gpu_check.json (--output) and exits
0 only if every check passed, 1 otherwise (the failed checks are listed last), 2 if the
device cannot be used (``--device cuda`` without CUDA). The temporary project is removed
unless a check failed or --keep is given (its logs/ hold every stage's output).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from metalab.data.episodes import Episodes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "gpu_check.json"

# The throughput configuration (benchmarks/throughput.py's C1).
N_WAY, K_SHOT, QUERIES, IMAGE_SIZE, HIDDEN = 5, 1, 15, 28, 64
INNER_LR, INNER_STEPS = 0.4, 1
RTOL = 1e-6
VARIANTS = ("loop", "vectorised", "vmap")
PRECISIONS = ("fp32", "bf16")
LEARNER_OPTIONS: dict[str, dict[str, Any]] = {
    "loop": {"vectorise_tasks": False, "channels_last": False},
    "vectorised": {},  # the defaults: chunks of 2 tasks, channels_last, task_parallel
}
# Tasks per vmapped pass: each holds about 280 MB of graph at this size (peak RSS of 8
# tasks, measured on the CPU), so 16 stay within a small GPU's memory at any meta-batch size.
VMAP_CHUNK = 16
TIMED_BUDGET_S = 30.0  # warmup and timed iterations stop early after this long (>= 1 each)


@dataclass(frozen=True)
class Mode:
    """How much work a run does (``--quick`` or the full check)."""

    name: str
    meta_batch_sizes: tuple[int, ...]
    warmup: int
    timed: int
    check_tasks: int  # tasks of the float64 meta-batch


QUICK = Mode("quick", (8,), warmup=1, timed=2, check_tasks=2)
FULL = Mode("full", (32, 128), warmup=2, timed=5, check_tasks=4)

# ------------------------------------------------------------------ tiny project
ARCHIVES = {"images_background": (4, 5), "images_evaluation": (3, 4)}  # alphabets, characters
DRAWINGS = 20
TINY_MODEL = {"name": "conv4", "hidden": 8}
RANDOM_START = "src/metalab/models"  # load_body_init: no file needed
DROPOUT_RATES = [0.05, 0.10, 0.15, 0.05]


def _experiment(algorithm: str, options: dict[str, Any] | None = None, **extra: Any) -> dict:
    return {
        "algorithm": algorithm,
        "body_init": RANDOM_START,
        "model": dict(TINY_MODEL),
        "options": options or {},
        **extra,
    }


EXPERIMENTS: dict[str, dict[str, Any]] = {
    "maml": _experiment("maml", {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 2}),
    "fomaml": _experiment(
        "maml", {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 2, "first_order": True}
    ),
    "mamlpp": _experiment(
        "maml",
        {
            "inner_lr": 0.4,
            "inner_steps": 2,
            "test_inner_steps": 2,
            "inner_lr_mode": "per_layer_per_step",
            "multi_step_loss": True,
            "multi_step_loss_iterations": 2,
            "per_step_batchnorm": True,
            "first_order_until_iteration": 1,
        },
        train={"lr_schedule": "cosine", "min_lr_fraction": 0.05},
    ),
    "metasgd": _experiment(
        "maml",
        {
            "inner_lr": 0.4,
            "inner_steps": 1,
            "test_inner_steps": 1,
            "inner_lr_mode": "per_parameter",
        },
    ),
    "anil": _experiment(
        "maml",
        {"adapt_parameters": "head", "inner_lr": 0.5, "inner_steps": 2, "test_inner_steps": 3},
    ),
    # The pretrain stage's body: the same network as `pretrain.model`.
    "anil_pretrained": _experiment(
        "maml",
        {
            "adapt_parameters": "head",
            "inner_lr": 0.5,
            "inner_steps": 2,
            "test_inner_steps": 3,
            "head_init": "zeros",
            "outer_trainable": "head_and_batchnorm",
        },
        body_init="models/pretrain",
    ),
    "taml_entropy": _experiment(
        "taml",
        {
            "variant": "entropy",
            "entropy_weight": 0.1,
            "inner_lr": 0.4,
            "inner_steps": 1,
            "test_inner_steps": 2,
        },
    ),
    "reptile": _experiment(
        "reptile",
        {
            "inner_steps": 2,
            "inner_lr": 0.001,
            "test_inner_steps": 2,
            "epsilon": 1.0,
            "epsilon_final": 0.0,
        },
    ),
    "cavia": _experiment(
        "cavia",
        {"num_context_params": 16, "inner_lr": 10.0, "inner_steps": 1, "test_inner_steps": 1},
    ),
    "protonets": _experiment("protonets"),
    "protonets_dropout": _experiment("protonets", {"task_dropout_rates": DROPOUT_RATES}),
    "generated_head": _experiment("generated_head"),
    "leo": _experiment("leo", {"latent_dim": 8, "inner_steps": 1, "finetune_steps": 1}),
}
RL_EXPERIMENTS: dict[str, dict[str, Any]] = {
    "maml_rl": {
        "algorithm": "maml_rl",
        "env": "navigation_2d",
        "iterations": 2,
        "meta_batch_size": 2,
        "trajectories_per_task": 2,
        "horizon": 5,
        "hidden_size": 8,
        "hidden_layers": 1,
        "eval_tasks": 2,
        "eval_adaptation_steps": [1],
        "num_threads": 1,
    }
}
EXPERIMENT_NAME = "gpu_check"
SYSTEM_METRICS_INTERVAL_S = 0.2
SYSTEM_METRICS_MIN_RUN_S = 1.0  # shorter runs may end before the monitor's first sample
STAGE_TIMEOUT_S = 900


# ------------------------------------------------------------------------ records
@dataclass
class StageRow:
    """One stage run: how it ended and where its metrics file says it computed."""

    stage: str
    experiment: str
    status: str  # ok, FAILED, skipped
    exit_code: int | None = None  # None: not run, or timed out
    seconds: float | None = None
    device: str | None = None
    gpu_peak_allocated_mb: float | None = None
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.stage}@{self.experiment}" if self.experiment else self.stage


@dataclass
class RunCheck:
    """What MLflow recorded for one stage run."""

    run: str
    status: str  # ok, FAILED
    device_tag: str | None = None
    gpu_peak_allocated_mb: float | None = None
    wall_time_s: float | None = None
    tasks_per_s: float | None = None
    system_metrics: str = ""
    system_sampled: bool = False  # the wanted system/* (or system/gpu_*) samples are there
    problems: list[str] = field(default_factory=list)


@dataclass
class GradientCheck:
    """A variant's float64 meta-gradient against the per-task loop's (on the CPU)."""

    variant: str
    device: str
    tasks: int
    status: str  # ok, FAILED
    max_scaled_error: float | None = None  # max |g - ref| / max |ref|
    relative_l2_error: float | None = None  # ||g - ref|| / ||ref||
    worst_parameter: str | None = None
    seconds: float | None = None
    note: str = ""


@dataclass
class ThroughputRow:
    """Meta-training speed of one variant, precision and meta-batch size."""

    variant: str
    precision: str
    tasks: int
    status: str  # ok, FAILED, skipped (bf16 unsupported), not timed (float64 check failed)
    tasks_per_s: float | None = None
    ratio_vs_loop: float | None = None
    timed_iterations: int | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    note: str = ""


# ------------------------------------------------------------------ table output
def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table. columns: (key, header, format spec such as ".2f");
    None prints as "-"; numbers are right-aligned, text left-aligned."""
    cells = [[header for _, header, _ in columns]]
    numeric = [False] * len(columns)
    for row in rows:
        line = []
        for index, (key, _, spec) in enumerate(columns):
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                numeric[index] = True
                line.append(format(value, spec))
            else:
                line.append("-" if value is None or value == "" else str(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        parts = [
            text.rjust(width) if is_number else text.ljust(width)
            for text, width, is_number in zip(line, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    header = render(cells[0])
    return "\n".join([header, "-" * len(header), *(render(line) for line in cells[1:])])


# -------------------------------------------------------------- tiny Omniglot data
def _drawing_png(strokes: list[Any], rng: Any) -> bytes:
    """One jittered drawing of a character's strokes: PNG bytes, 105x105, mode "1",
    paper white (1) and ink black (0) like the official files."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("1", (105, 105), 1)
    pen = ImageDraw.Draw(image)
    shift = rng.uniform(-4, 4, size=2)
    for stroke in strokes:
        points = stroke + shift + rng.uniform(-2, 2, size=stroke.shape)
        pen.line([tuple(point) for point in points.tolist()], fill=0, width=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_archives(directory: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write images_background.zip and images_evaluation.zip (`ARCHIVES` alphabets and
    characters, `DRAWINGS` drawings each) into `directory` in the official layout,
    ``<archive>/<alphabet>/characterNN/NNNN_DD.png`` with character ids running on from one
    archive into the next. Each character is 2-4 random strokes that every drawing redraws
    with a small shift and jitter, so there is something to learn. Returns the counts
    (``data.expected``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    character_id = 1
    counts = {}
    for archive, (alphabets, characters) in ARCHIVES.items():
        with zipfile.ZipFile(directory / f"{archive}.zip", "w", zipfile.ZIP_STORED) as zipped:
            for alphabet in range(1, alphabets + 1):
                for number in range(1, characters + 1):
                    strokes = [
                        rng.uniform(20, 85, size=(int(rng.integers(3, 6)), 2))
                        for _ in range(int(rng.integers(2, 5)))
                    ]
                    folder = f"{archive}/{archive[7:].title()}_Script_{alphabet:02d}"
                    for drawer in range(1, DRAWINGS + 1):
                        member = (
                            f"{folder}/character{number:02d}/{character_id:04d}_{drawer:02d}.png"
                        )
                        zipped.writestr(member, _drawing_png(strokes, rng))
                    character_id += 1
        counts[archive] = {
            "alphabets": alphabets,
            "characters": alphabets * characters,
            "drawings": alphabets * characters * DRAWINGS,
        }
    return counts


def project_params(archive_dir: Path, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """A complete params.yaml for the throwaway project: tiny data, every learner family
    for a few iterations, one tiny RL run; MLflow on."""
    return {
        "data": {
            "sources": [str(archive_dir)],
            "download_timeout": 5,
            "expected": counts,
            "image_size": 28,
            "prefetch_workers": 1,
            "split": {"protocol": "lake", "seed": 0, "validation_characters": 5},
        },
        # Enough episodes that an evaluate run lasts a few system-metric samples.
        "episodes": {"settings": ["5w1s"], "num_episodes": 20, "query_per_class": 2, "seed": 2017},
        "tracking": {"experiment_name": EXPERIMENT_NAME, "enabled": True},
        "pretrain": {
            "model": dict(TINY_MODEL),
            "epochs": 1,
            "batch_size": 64,
            "lr": 0.001,
            "seed": 0,
            "threads": 1,
        },
        "train": {
            "n_way": 5,
            "k_shot": 1,
            "query_per_class": 2,
            "meta_batch_size": 2,
            "iterations": 3,
            "validate_every": 2,
            "validation_episodes": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "threads": 1,
            "precision": "fp32",
            "seed": 0,
        },
        "experiments": EXPERIMENTS,
        "rl_experiments": RL_EXPERIMENTS,
        "evaluate": {"settings": None, "adaptation_steps": None, "max_episodes": None},
        "report": {"sort_by": "5w1s", "pairs": []},
    }


# ------------------------------------------------------------------------ 1. stages
METRICS_FILES = {
    "train": "metrics/train/{}.json",
    "evaluate": "metrics/eval/{}.json",
    "train_rl": "metrics/train_rl/{}.json",
    "evaluate_rl": "metrics/eval_rl/{}.json",
}


def stage_record(project: Path, stage: str, experiment: str) -> dict[str, Any]:
    """What `stage` recorded for `experiment` in `project`: its metrics file's numbers and,
    from the info file beside it, its text (the device); `MetricsFileError` if unreadable."""
    from metalab.records import schema_for

    relative = Path(METRICS_FILES[stage].format(experiment))
    return schema_for(relative.relative_to("metrics")).read(project / relative).to_dict()


def stage_environment(device: str, project: Path) -> dict[str, str]:
    """The stages' environment: the device, the project's own MLflow store, frequent
    system-metric samples (tiny runs last seconds), this checkout's metalab first."""
    env = dict(os.environ)
    for variable in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(variable, None)  # a DVC caller's settings would redirect the store and tags
    env.update(
        METALAB_DEVICE=device,
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=str(SYSTEM_METRICS_INTERVAL_S),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
    )
    return env


def expected_device_problem(row_device: str | None, gpu_mb: float | None, device_type: str) -> str:
    """Why a metrics file's device fields do not show a run on `device_type` ("" if they
    do). Missing fields are tolerated on the CPU (files from before they were recorded)."""
    if row_device is not None and not row_device.startswith(device_type):
        return f"metrics file says device {row_device}"
    if device_type == "cuda":
        if row_device is None:
            return "metrics file has no device"
        if not gpu_mb:
            return "metrics file has no gpu_peak_allocated_mb > 0"
    return ""


def run_stage(
    stage: str, experiment: str, project: Path, env: dict[str, str], device_type: str
) -> StageRow:
    """Run ``stages/<stage>.py [experiment]`` in `project`; its output goes to logs/."""
    command = [sys.executable, str(ROOT / "stages" / f"{stage}.py")]
    command += [experiment] if experiment else []
    command += ["--no-progress"]
    row = StageRow(stage, experiment, "FAILED")
    log = project / "logs" / f"{row.name.replace('@', '_')}.log"
    started = time.perf_counter()
    try:
        with open(log, "w") as output:
            result = subprocess.run(
                command,
                cwd=project,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=STAGE_TIMEOUT_S,
            )
        row.exit_code = result.returncode
    except subprocess.TimeoutExpired:
        row.exit_code = None
    row.seconds = time.perf_counter() - started
    if row.exit_code != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        reason = (
            f"timed out after {STAGE_TIMEOUT_S} s"
            if row.exit_code is None
            else f"exit {row.exit_code}"
        )
        row.note = f"{reason}: {last[:160]}"
        return row
    if stage in METRICS_FILES:
        try:
            metrics = stage_record(project, stage, experiment)
        except ValueError as error:  # MetricsFileError: one line naming the file
            row.note = f"metrics file unreadable: {error}"
            return row
        row.device = metrics.get("device")
        row.gpu_peak_allocated_mb = metrics.get("gpu_peak_allocated_mb")
        problem = expected_device_problem(row.device, row.gpu_peak_allocated_mb, device_type)
        if problem:
            row.note = problem
            return row
    else:
        row.note = "no device stage" if stage != "pretrain" else "no metrics file: see MLflow"
    row.status = "ok"
    return row


def run_stages(project: Path, env: dict[str, str], device_type: str) -> list[StageRow]:
    """The pipeline in dependency order. A stage whose input stage did not exit 0 is
    skipped; one after a stage that ran but failed a device check still runs, so that one
    run shows every problem."""
    rows: list[StageRow] = []

    def run(stage: str, experiment: str = "", needs: Sequence[StageRow] = ()) -> StageRow:
        failed = [row.name for row in needs if row.exit_code != 0]
        if failed:
            row = StageRow(stage, experiment, "skipped", note=f"needs {', '.join(failed)}")
        else:
            row = run_stage(stage, experiment, project, env, device_type)
        rows.append(row)
        print(f"  {row.name:<28} {row.status:<7} {row.seconds or 0:6.1f} s  {row.note}", flush=True)
        return row

    download = run("download")
    prefetch = run("prefetch", needs=[download])
    episodes = run("episodes", needs=[prefetch])
    pretrain = run("pretrain", needs=[prefetch])
    for name, experiment in EXPERIMENTS.items():
        inputs = (
            [prefetch, pretrain] if experiment["body_init"] == "models/pretrain" else [prefetch]
        )
        train = run("train", name, needs=inputs)
        run("evaluate", name, needs=[train, episodes])
    for name in RL_EXPERIMENTS:
        train = run("train_rl", name)
        run("evaluate_rl", name, needs=[train])
    return rows


# ------------------------------------------------------------------------ 2. MLflow
SYSTEM_METRIC_STAGES = ("train", "evaluate")  # stages that open their run with system_metrics


def nvml_importable() -> bool:
    """Whether nvidia-ml-py (module ``pynvml``), which MLflow's GPU monitor needs, is
    installed for this interpreter (the stages run with it too)."""
    import importlib.util

    return importlib.util.find_spec("pynvml") is not None


def check_run(run: Any, stage: str, device_type: str, nvml: bool) -> RunCheck:
    """The MLflow record (an ``mlflow.entities.Run``) of one device stage's run against
    what a run on `device_type` must carry (module docstring, step 2). Only metric keys
    matter, so the last values `search_runs` returns are enough."""
    metrics, tags = run.data.metrics, run.data.tags
    check = RunCheck(
        run=tags.get("dvc_stage", "?"),
        status="FAILED",
        device_tag=tags.get("device"),
        gpu_peak_allocated_mb=metrics.get("gpu_peak_allocated_mb"),
        wall_time_s=metrics.get("wall_time_s"),
        tasks_per_s=metrics.get("tasks_per_s"),
    )
    problems = check.problems
    if run.info.status != "FINISHED":
        problems.append(f"run status {run.info.status}")
    if not (check.device_tag or "").startswith(device_type):
        problems.append(f"device tag {check.device_tag!r}, expected {device_type}*")
    if device_type == "cuda" and not check.gpu_peak_allocated_mb:
        problems.append("no gpu_peak_allocated_mb > 0")
    for key in ("wall_time_s", "tasks_per_s"):
        if key not in metrics:
            problems.append(f"no {key}")
    if stage in SYSTEM_METRIC_STAGES:
        system = {key for key in metrics if key.startswith("system/")}
        gpu = {key for key in system if key.startswith("system/gpu_")}
        too_short = (check.wall_time_s or 0.0) < SYSTEM_METRICS_MIN_RUN_S
        if device_type == "cuda" and not nvml:
            check.system_metrics = "skipped: nvidia-ml-py not installed"
        elif device_type == "cuda" and gpu:
            check.system_metrics, check.system_sampled = f"{len(gpu)} system/gpu_*", True
        elif device_type != "cuda" and system:
            check.system_metrics, check.system_sampled = f"{len(system)} system/*", True
        elif not system and too_short:
            check.system_metrics = f"skipped: run under {SYSTEM_METRICS_MIN_RUN_S:g} s"
        else:
            wanted = "system/gpu_*" if device_type == "cuda" else "system/*"
            check.system_metrics = f"no {wanted}"
            problems.append(f"no {wanted} metric")
    if not problems:
        check.status = "ok"
    return check


def check_mlflow(project: Path, rows: Sequence[StageRow], device_type: str) -> list[RunCheck]:
    """Read the project's MLflow store and check the run of every device stage that ran."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id])
    by_stage = {}
    for run in sorted(runs, key=lambda run: run.info.start_time):
        by_stage[run.data.tags.get("dvc_stage")] = run  # the latest run of each stage
    nvml = nvml_importable()
    checks = []
    for row in rows:
        if row.stage in ("download", "prefetch", "episodes") or row.status == "skipped":
            continue
        run = by_stage.get(row.name)
        if run is None:
            checks.append(RunCheck(row.name, "FAILED", problems=["no MLflow run"]))
            continue
        checks.append(check_run(run, row.stage, device_type, nvml))
    # Runs too short to sample are skipped, but not all of them: the check must see some.
    monitored = [check for check in checks if check.system_metrics]
    sampled = [check for check in monitored if check.system_sampled]
    if monitored and not sampled and not (device_type == "cuda" and not nvml):
        wanted = "system/gpu_*" if device_type == "cuda" else "system/*"
        problem = f"no train or evaluate run has {wanted} samples"
        checks.append(RunCheck("(all train/evaluate)", "FAILED", problems=[problem]))
    return checks


# ------------------------------------------------------- 3. the three MAML variants
def plain_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Training-mode (transductive) BatchNorm over dims (0, 2, 3) from plain tensor ops.

    x [B, C, H, W], weight/bias [C] -> [B, C, H, W]. Statistics in at least float32 (bf16
    activations under autocast), output in x's dtype. Under vmap, its double backward is
    composed of elementary derivatives, which vmap batches correctly.
    """
    import torch

    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    var, mean = torch.var_mean(x.to(stats_dtype), dim=(0, 2, 3), correction=0)
    scale = weight.to(stats_dtype) * torch.rsqrt(var + eps)
    shift = bias.to(stats_dtype) - mean * scale
    return (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def builtin_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """torch's own training-mode BatchNorm, x [B, C, H, W] -> [B, C, H, W]: right on its
    own, but its double backward under vmap is off (see `gradient_check`)."""
    import torch.nn.functional as F

    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


BatchNorm = Callable[["Tensor", "Tensor", "Tensor", float], "Tensor"]


def conv4_blocks(model: nn.Module) -> list[tuple[int, int, float, bool]]:
    """(conv stride, conv padding, BatchNorm eps, max-pooling?) of each block of a
    `metalab.models.Conv4`, so the functional forward computes the module's function."""
    from torch import nn

    blocks = []
    for block in model.body:
        conv, norm = block[0], block[1]
        pooled = isinstance(block[-1], nn.MaxPool2d)
        blocks.append((conv.stride[0], conv.padding[0], norm.eps, pooled))
    return blocks


def conv4_logits(
    params: Mapping[str, Tensor],
    x: Tensor,
    blocks: Sequence[tuple[int, int, float, bool]],
    batch_norm: BatchNorm,
) -> Tensor:
    """A Conv4's logits for one task as a function of its parameter dict (the module's
    names: ``body.<i>.0.*`` conv, ``body.<i>.1.*`` BatchNorm, ``head.*``).

    x [B, C, H, W] -> [B, N]; BatchNorm normalises with this batch's statistics.
    """
    import torch.nn.functional as F

    h = x
    for index, (stride, padding, eps, pooled) in enumerate(blocks):
        h = F.conv2d(
            h,
            params[f"body.{index}.0.weight"],
            params[f"body.{index}.0.bias"],
            stride=stride,
            padding=padding,
        )
        h = batch_norm(h, params[f"body.{index}.1.weight"], params[f"body.{index}.1.bias"], eps)
        h = F.relu(h)
        if pooled:
            h = F.max_pool2d(h, 2)
    return F.linear(h.flatten(1), params["head.weight"], params["head.bias"])


def vmap_meta_gradients(
    model: nn.Module,
    episodes: Episodes,
    *,
    inner_lr: float = INNER_LR,
    inner_steps: int = INNER_STEPS,
    precision: str = "fp32",
    chunk_size: int = VMAP_CHUNK,
    batch_norm: BatchNorm = plain_batch_norm,
) -> dict[str, Tensor]:
    """Second-order MAML meta-gradient of the mean query loss over the meta-batch with
    ``torch.func``: the inner loop is ``grad`` of one task's support loss as a function of
    the parameter dict, ``vmap`` runs it over the tasks of a chunk, and ``grad`` of the
    chunk's summed query losses gives its share of the meta-gradient.

    `model` is a Conv4 (its parameters are read, not changed); episodes: support_x
    [T, N*K, 1, H, W], support_y [T, N*K], query_x [T, N*Q, 1, H, W], query_y [T, N*Q], on
    the model's device. ``precision="bf16"`` runs under bf16 autocast. Returns
    {parameter name: gradient shaped like the parameter}, the gradient of the mean over T.
    """
    import torch
    import torch.nn.functional as F
    from torch.func import grad, vmap

    blocks = conv4_blocks(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    dtype = params["head.weight"].dtype
    loss_dtype = torch.promote_types(dtype, torch.float32)
    num_tasks = episodes.num_tasks

    def loss(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(conv4_logits(p, x, blocks, batch_norm).to(loss_dtype), y)

    def task_query_loss(
        p: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        for _ in range(inner_steps):
            inner = grad(loss)(p, sx, sy)  # stays differentiable: second order
            p = {name: p[name] - inner_lr * inner[name] for name in p}
        return loss(p, qx, qy)

    batched = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))
    device_type = params["head.weight"].device.type
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, num_tasks, chunk_size):
        part = episodes[start : start + chunk_size]
        inputs = (part.support_x.to(dtype), part.support_y, part.query_x.to(dtype), part.query_y)

        def chunk_loss(p: dict[str, Tensor], inputs: tuple = inputs) -> Tensor:
            return batched(p, *inputs).sum() / num_tasks

        enabled = precision == "bf16"
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled):
            chunk_grads = grad(chunk_loss)(params)
        for name in total:
            total[name] += chunk_grads[name]
    return total


def random_episodes(num_tasks: int, seed: int = 0) -> Episodes:
    """Binary images with Omniglot-like ink density (~20%), labels class-major, on the CPU:
    support_x [T, 5, 1, 28, 28], query_x [T, 75, 1, 28, 28]."""
    import torch

    from metalab.data.episodes import Episodes

    generator = torch.Generator().manual_seed(seed)

    def images(count: int) -> torch.Tensor:
        shape = (num_tasks, count, 1, IMAGE_SIZE, IMAGE_SIZE)
        return (torch.rand(shape, generator=generator) < 0.2).float()

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(num_tasks, 1)

    return Episodes(
        images(N_WAY * K_SHOT), labels(K_SHOT), images(N_WAY * QUERIES), labels(QUERIES)
    )


def make_conv4(hidden: int = HIDDEN, image_size: int = IMAGE_SIZE, seed: int = 0) -> nn.Module:
    """The benchmark's network: Conv4 with max-pooling, `hidden` channels, on the CPU."""
    import torch

    from metalab.models import Conv4

    torch.manual_seed(seed)
    return Conv4(N_WAY, image_size, hidden=hidden, downsample="maxpool")


def learner_meta_gradients(
    model: nn.Module, episodes: Episodes, variant: str, precision: str = "fp32"
) -> dict[str, Tensor]:
    """The meta-gradient `metalab.algorithms.maml.MAMLLearner` leaves for `variant`
    ("loop" or "vectorised"), second order, one inner step; {name: gradient}. `model` is
    copied (the learner changes its BatchNorm settings and gradients)."""
    from metalab.algorithms.base import TrainProgress
    from metalab.algorithms.maml import MAMLLearner, Options

    options = Options(inner_lr=INNER_LR, inner_steps=INNER_STEPS, **LEARNER_OPTIONS[variant])
    learner = MAMLLearner(copy.deepcopy(model), N_WAY, options, precision=precision)
    learner.meta_gradients(episodes, TrainProgress(0, 1))
    return {name: p.grad.detach() for name, p in learner.model.named_parameters()}


def compare_gradients(
    grads: Mapping[str, Tensor], reference: Mapping[str, Tensor], rtol: float = RTOL
) -> tuple[bool, float | None, float | None, str]:
    """Whether `grads` equal `reference` within `rtol`: |g - r| <= rtol * (|r| + max|r|)
    elementwise, the absolute part scaled by the largest reference entry because some
    true meta-gradients are 0 (conv biases ahead of BatchNorm) and carry only rounding
    noise. Returns (passed, max |g - r| / max |r|, ||g - r|| / ||r||, the parameter with
    the largest scaled error); errors None and the odd names out if the names differ."""
    import torch

    names = list(reference)
    if set(grads) != set(names):
        missing = sorted(set(names) ^ set(grads))
        return False, None, None, ", ".join(missing)
    ref = {name: reference[name].detach().double().cpu() for name in names}
    got = {name: grads[name].detach().double().cpu() for name in names}
    scale = max(float(r.abs().max()) for r in ref.values()) or 1.0
    errors = {name: float((got[name] - ref[name]).abs().max()) / scale for name in names}
    worst = max(names, key=errors.__getitem__)
    flat_ref = torch.cat([r.flatten() for r in ref.values()])
    flat_got = torch.cat([got[name].flatten() for name in names])
    difference = (flat_got - flat_ref).abs()
    passed = bool((difference <= rtol * (flat_ref.abs() + scale)).all())
    relative_l2 = float(difference.norm() / flat_ref.norm())
    return passed, errors[worst], relative_l2, worst


def variant_meta_gradients(
    variant: str,
    model: nn.Module,
    episodes: Episodes,
    precision: str = "fp32",
    chunk_size: int = VMAP_CHUNK,
    batch_norm: BatchNorm = plain_batch_norm,
) -> dict[str, Tensor]:
    """`variant`'s meta-gradient of `model` on `episodes` (both on the same device)."""
    if variant in LEARNER_OPTIONS:
        return learner_meta_gradients(model, episodes, variant, precision)
    return vmap_meta_gradients(
        model, episodes, precision=precision, chunk_size=chunk_size, batch_norm=batch_norm
    )


def gradient_check(
    variant: str,
    device: torch.device | str,
    *,
    tasks: int = 2,
    hidden: int = HIDDEN,
    reference: Mapping[str, Tensor] | None = None,
    batch_norm: BatchNorm = plain_batch_norm,
    rtol: float = RTOL,
) -> GradientCheck:
    """`variant`'s float64 meta-gradient on `device` against the per-task loop's on the
    CPU, on one fixed meta-batch of `tasks` tasks of the benchmark configuration (Conv4
    with `hidden` channels). vmap runs it in chunks of half the tasks, so adding up
    chunks is checked too. `reference`: the loop's gradients, if already computed."""
    model = make_conv4(hidden).double()
    episodes = random_episodes(tasks, seed=1)
    if reference is None:
        reference = learner_meta_gradients(model, episodes, "loop")
    started = time.perf_counter()
    check = GradientCheck(variant, str(device), tasks, "FAILED")
    try:
        grads = variant_meta_gradients(
            variant,
            model.to(device),
            episodes.to(device),
            chunk_size=max(1, tasks // 2),
            batch_norm=batch_norm,
        )
    except Exception as error:  # a variant that crashes fails its check, the rest go on
        check.note = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
        return check
    finally:
        check.seconds = time.perf_counter() - started
    passed, check.max_scaled_error, check.relative_l2_error, check.worst_parameter = (
        compare_gradients(grads, reference, rtol)
    )
    check.status = "ok" if passed else "FAILED"
    if not passed:
        check.note = f"differs from the loop beyond rtol {rtol:g}"
    elif variant == "loop" and str(device) == "cpu":
        check.note = "the reference itself"
    return check


def gradient_checks(device: torch.device, tasks: int) -> list[GradientCheck]:
    """Every variant's float64 check on `device`, all against one CPU loop reference."""
    import torch

    model = make_conv4().double()
    reference = learner_meta_gradients(model, random_episodes(tasks, seed=1), "loop")
    checks = []
    for variant in VARIANTS:
        checks.append(gradient_check(variant, device, tasks=tasks, reference=reference))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return checks


def make_stepper(
    variant: str, precision: str, device: torch.device, episodes: Episodes, chunk_size: int
) -> Callable[[int], None]:
    """One meta-iteration of `variant` (zero_grad, meta-gradient, Adam step) on
    `episodes`, as a function of the iteration index."""
    import torch

    from metalab.algorithms.base import TrainProgress
    from metalab.algorithms.maml import MAMLLearner, Options

    model = make_conv4().to(device)
    if variant in LEARNER_OPTIONS:
        options = Options(inner_lr=INNER_LR, inner_steps=INNER_STEPS, **LEARNER_OPTIONS[variant])
        learner = MAMLLearner(model, N_WAY, options, precision=precision).to(device)
        optimizer = torch.optim.Adam(learner.parameter_groups(), lr=1e-3)

        def learner_step(index: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            learner.meta_gradients(episodes, TrainProgress(index, 1000))
            optimizer.step()

        return learner_step
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def vmap_step(index: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        grads = vmap_meta_gradients(model, episodes, precision=precision, chunk_size=chunk_size)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        optimizer.step()

    return vmap_step


def measure_throughput(
    variant: str,
    precision: str,
    tasks: int,
    device: torch.device,
    warmup: int,
    timed: int,
    chunk_size: int = VMAP_CHUNK,
) -> dict[str, Any]:
    """Run in a worker process: tasks/s of up to `timed` meta-iterations after up to
    `warmup` ones, and the peak memory of the timed ones (CUDA allocator peak; on the CPU
    the process's peak RSS, which cannot be reset, hence one process per measurement).
    Iterations beyond the first of each kind stop once `TIMED_BUDGET_S` is spent, which
    only a slow device reaches (a CPU at 128 tasks): one slow iteration warms up enough."""
    import torch

    from metalab.device import synchronize
    from metalab.runtime import max_rss_mb

    episodes = random_episodes(tasks).to(device)
    step = make_stepper(variant, precision, device, episodes, chunk_size)
    started = time.perf_counter()
    warmed = 0
    while warmed < warmup:
        step(warmed)
        warmed += 1
        synchronize(device)
        if time.perf_counter() - started > TIMED_BUDGET_S:
            break
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    iterations = 0
    while iterations < timed:
        step(warmed + iterations)
        iterations += 1
        if time.perf_counter() - started > TIMED_BUDGET_S:
            break
    synchronize(device)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU allocated"
    else:
        peak, kind = max_rss_mb(), "host RSS"
    return {
        "tasks_per_s": tasks * iterations / seconds,
        "timed_iterations": iterations,
        "peak_memory_mb": peak,
        "memory_kind": kind,
    }


def run_worker(args: argparse.Namespace) -> None:
    """``--worker``: one measurement in this process, its JSON on the last stdout line."""
    from metalab.device import configure, resolve_device, thread_count
    from metalab.runtime import keep_freed_memory

    keep_freed_memory()  # as every stage does
    device = resolve_device(args.device)
    configure(device, thread_count())
    if args.worker == "gradient-check":
        result: Any = [asdict(check) for check in gradient_checks(device, args.check_tasks)]
    else:
        variant, precision, tasks = args.worker.split(",")
        result = measure_throughput(
            variant, precision, int(tasks), device, args.warmup, args.timed, args.vmap_chunk
        )
    print(json.dumps(result))


def spawn_worker(worker: str, args: argparse.Namespace, device: str, timeout: float) -> Any:
    """Run ``--worker`` in a fresh process; its JSON result, or RuntimeError with the last
    line of its error output."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker]
    command += ["--device", device, "--warmup", str(args.warmup), "--timed", str(args.timed)]
    command += ["--vmap-chunk", str(args.vmap_chunk), "--check-tasks", str(args.check_tasks)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"exit {result.returncode}: {lines[-1] if lines else 'no output'}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_throughput(
    args: argparse.Namespace, device: torch.device, mode: Mode, passed: set[str]
) -> list[ThroughputRow]:
    """Time every variant that passed its float64 check, fp32 and bf16, at every
    meta-batch size of `mode`; ratios to the loop in fp32 at the same size."""
    import torch

    bf16_reason = ""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        bf16_reason = f"{torch.cuda.get_device_name(device)} does not support bf16"
    rows = []
    for tasks in mode.meta_batch_sizes:
        for variant in VARIANTS:
            for precision in PRECISIONS:
                row = ThroughputRow(variant, precision, tasks, "skipped")
                if variant not in passed:  # its float64 check is the failure listed
                    row.status, row.note = "not timed", "failed its float64 check"
                elif precision == "bf16" and bf16_reason:
                    row.note = bf16_reason
                else:
                    try:
                        measured = spawn_worker(
                            f"{variant},{precision},{tasks}", args, str(device), timeout=1800
                        )
                        row.status = "ok"
                        row.tasks_per_s = measured["tasks_per_s"]
                        row.timed_iterations = measured["timed_iterations"]
                        row.peak_memory_mb = measured["peak_memory_mb"]
                        row.memory_kind = measured["memory_kind"]
                    except (RuntimeError, ValueError) as error:
                        row.status, row.note = "FAILED", str(error)[:200]
                rows.append(row)
                speed = f"{row.tasks_per_s:8.2f} tasks/s" if row.tasks_per_s else ""
                print(
                    f"  {variant:<10} {precision:<4} {tasks:>4} tasks  {row.status:<7} {speed}"
                    f" {row.note}",
                    flush=True,
                )
        baseline = next(
            (r for r in rows if (r.variant, r.precision, r.tasks) == ("loop", "fp32", tasks)), None
        )
        if baseline is not None and baseline.tasks_per_s:
            for row in rows:
                if row.tasks == tasks and row.tasks_per_s:
                    row.ratio_vs_loop = row.tasks_per_s / baseline.tasks_per_s
    return rows


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 every check passed, 1 a check failed, 2 the device is unusable.",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        help="where to compute, as METALAB_DEVICE: cuda (default), cuda:N, cpu or auto",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke mode: meta-batches of {QUICK.meta_batch_sizes[0]} tasks only, "
        f"{QUICK.warmup} warmup + {QUICK.timed} timed iterations",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result (default: %(default)s)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary project even if all passed"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--vmap-chunk",
        type=int,
        default=VMAP_CHUNK,
        help="tasks per vmapped pass of the vmap variant; about 0.3 GB each in fp32 "
        "(default: %(default)s)",
    )
    parser.add_argument("--check-tasks", type=int, help=argparse.SUPPRESS)
    return parser


def print_report(
    stages: list[StageRow],
    runs: list[RunCheck],
    gradients: list[GradientCheck],
    throughput: list[ThroughputRow],
) -> None:
    print("\nStages")
    print(
        format_table(
            [asdict(row) | {"name": row.name} for row in stages],
            [
                ("name", "stage", ""),
                ("status", "status", ""),
                ("seconds", "seconds", ".1f"),
                ("device", "device", ""),
                ("gpu_peak_allocated_mb", "GPU peak MB", ".1f"),
                ("note", "note", ""),
            ],
        )
    )
    print("\nMLflow runs")
    print(
        format_table(
            [asdict(run) | {"problems": "; ".join(run.problems)} for run in runs],
            [
                ("run", "run", ""),
                ("status", "status", ""),
                ("device_tag", "device tag", ""),
                ("gpu_peak_allocated_mb", "GPU peak MB", ".1f"),
                ("wall_time_s", "wall s", ".1f"),
                ("tasks_per_s", "tasks/s", ".1f"),
                ("system_metrics", "system metrics", ""),
                ("problems", "problems", ""),
            ],
        )
    )
    print(f"\nfloat64 meta-gradients vs the per-task loop on the CPU (rtol {RTOL:g})")
    print(
        format_table(
            [asdict(check) for check in gradients],
            [
                ("variant", "variant", ""),
                ("device", "device", ""),
                ("tasks", "tasks", "d"),
                ("status", "status", ""),
                ("max_scaled_error", "max err/max|ref|", ".2e"),
                ("relative_l2_error", "rel. L2 err", ".2e"),
                ("worst_parameter", "worst parameter", ""),
                ("seconds", "seconds", ".1f"),
                ("note", "note", ""),
            ],
        )
    )
    print(
        f"\nThroughput: MAML 5-way {K_SHOT}-shot, {QUERIES} queries, Conv4({HIDDEN}) "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}, second order, {INNER_STEPS} inner step"
    )
    print(
        format_table(
            [asdict(row) for row in throughput],
            [
                ("variant", "variant", ""),
                ("precision", "precision", ""),
                ("tasks", "tasks", "d"),
                ("status", "status", ""),
                ("tasks_per_s", "tasks/s", ".2f"),
                ("ratio_vs_loop", "x loop fp32", ".2f"),
                ("timed_iterations", "timed", "d"),
                ("peak_memory_mb", "peak MB", ".0f"),
                ("memory_kind", "memory", ""),
                ("note", "note", ""),
            ],
        )
    )


def failed_checks(
    stages: list[StageRow],
    runs: list[RunCheck],
    gradients: list[GradientCheck],
    throughput: list[ThroughputRow],
) -> list[str]:
    """One line per check that did not pass (skips for a stated reason do not count,
    except stages skipped because their input failed, which fail with it)."""
    failed = [
        f"stage {row.name}: {row.status} ({row.note})" for row in stages if row.status != "ok"
    ]
    failed += [f"MLflow {run.run}: {'; '.join(run.problems)}" for run in runs if run.status != "ok"]
    failed += [
        f"float64 {check.variant} on {check.device}: {check.note}"
        for check in gradients
        if check.status != "ok"
    ]
    failed += [
        f"throughput {row.variant} {row.precision} {row.tasks} tasks: {row.note}"
        for row in throughput
        if row.status == "FAILED"
    ]
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's metalab, installed or not
    if args.worker:
        run_worker(args)
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from metalab.device import DEVICE_VARIABLE, DeviceSettingError, describe, resolve_device
    from metalab.io import write_json

    try:
        device = resolve_device(args.device)
    except DeviceSettingError as error:
        # The message speaks of the variable; here the same value came from --device.
        print(f"error: {str(error).replace(f'{DEVICE_VARIABLE}=', '--device ')}", file=sys.stderr)
        return 2
    mode = QUICK if args.quick else FULL
    args.warmup = mode.warmup if args.warmup is None else args.warmup
    args.timed = mode.timed if args.timed is None else args.timed
    args.check_tasks = mode.check_tasks if args.check_tasks is None else args.check_tasks
    started = time.perf_counter()
    print(
        f"metalab GPU check ({mode.name}) on {device} ({describe(device)}), torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}",
        flush=True,
    )

    workdir = Path(tempfile.mkdtemp(prefix="metalab-gpu-check-"))
    project = workdir / "project"
    (project / "logs").mkdir(parents=True)
    archives = workdir / "archives"
    archives.mkdir()
    print(f"1. stages in {project}", flush=True)
    import yaml

    counts = make_archives(archives)
    (project / "params.yaml").write_text(
        yaml.safe_dump(project_params(archives, counts), sort_keys=False)
    )
    stages = run_stages(project, stage_environment(str(device), project), device.type)

    print("2. MLflow records", flush=True)
    runs = check_mlflow(project, stages, device.type)

    print("3. float64 meta-gradient checks", flush=True)
    try:
        gradients = [
            GradientCheck(**check)
            for check in spawn_worker("gradient-check", args, str(device), timeout=3600)
        ]
    except (RuntimeError, ValueError) as error:
        gradients = [GradientCheck("all", str(device), args.check_tasks, "FAILED", note=str(error))]
    for check in gradients:
        print(f"  {check.variant:<10} {check.status:<7} {check.note}", flush=True)
    passed = {check.variant for check in gradients if check.status == "ok"}
    print("4. throughput", flush=True)
    throughput = run_throughput(args, device, mode, passed)

    print_report(stages, runs, gradients, throughput)
    failed = failed_checks(stages, runs, gradients, throughput)
    keep = args.keep or bool(failed)
    seconds = time.perf_counter() - started
    result = {
        "mode": mode.name,
        "device": str(device),
        "device_name": describe(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "seconds": round(seconds, 1),
        "passed": not failed,
        "failed": failed,
        "stages": [asdict(row) for row in stages],
        "mlflow": [asdict(run) for run in runs],
        "gradient_checks": [asdict(check) for check in gradients],
        "throughput": [asdict(row) for row in throughput],
        "workdir": str(workdir) if keep else None,
    }
    write_json(args.output, result)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{seconds / 60:.1f} min; wrote {args.output}")
    if keep:
        print(f"kept the temporary project: {project} (stage output in logs/)")
    if failed:
        print(f"\nFAILED: {len(failed)} check(s):")
        for line in failed:
            print(f"  {line}")
        return 1
    print("\nPASSED: every check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
