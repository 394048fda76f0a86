"""Every vision learner trains and adapts on the device its parameters and inputs are on.

The trainer builds a learner on the CPU (the same seeded start everywhere), moves it with
``learner.to(device)`` and hands it inputs on that device. A tensor that the training or
adaptation path creates on a fixed device (a factory call without ``device=``, a dropout
mask drawn on the CPU and not moved, autocast named "cpu") breaks a GPU run. This machine
has no GPU, so every learner runs on the ``meta`` device: tensors with a shape, a dtype
and a device but no data. Ops check that their operands share a device as on CUDA (a 0-dim
CPU tensor may join in, as on CUDA), so a CPU tensor meeting a meta one fails here as it
would on a GPU. With a GPU, `test_cuda_meta_gradients_match_the_cpu` also compares numbers.

Meta tensors have no values, which two things on these paths need:

* host reads (``.item()``, ``float``, ``int``, ``bool`` of a tensor: logged statistics and
  the way count of a support set's labels) get placeholders (`MetaHostReads`): the labels'
  largest value for integers, so shapes stay right, NaN for floats, False for bools;
* `class_means` selects rows with a boolean mask, i.e. ``aten::nonzero``, whose output
  shape depends on the data and which has no meta kernel; meta runs use the same means
  through a one-hot matrix. `test_cpu_run_creates_no_tensor_on_the_default_device` runs
  the real code on CPU data with ``meta`` as the default device instead, so that a factory
  without ``device=`` anywhere (class_means included) makes a meta tensor that fails
  against the CPU data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import (
    embedding,
    film_prototypes,
    generated_head,
    leo,
    precision,
    protonets,
    task_runner,
)
from metalab.algorithms.base import BuildContext, MetaLearner, StepStats, TrainProgress
from metalab.algorithms.registry import ALGORITHMS, build_learner, options_class
from metalab.algorithms.task_runner import TaskRunner
from metalab.data.episodes import Episodes
from metalab.models import ModelConfig, draw_dropout_masks
from metalab.params import load_params

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
N_WAY = 3  # the way count learners are built for
OTHER_WAY = 2  # a test-time way count other than the trained one (CAVIA allows only fewer)
K_SHOT, QUERIES, TASKS, IMAGE_SIZE = 2, 2, 2, 16
RATES = [0.05, 0.1, 0.15, 0.05]

# The emulated-bf16 warning of this CPU is not what these tests look at.
pytestmark = pytest.mark.filterwarnings("ignore:precision bf16")


@dataclass(frozen=True)
class Case:
    """A learner configuration: ``options`` as in params.yaml, a Conv4 (8 channels) or a
    ResNet18, and the meta-iteration its meta-gradients are taken at."""

    name: str
    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    model: str = "conv4"
    downsample: str = "maxpool"
    iteration: int = 0
    #: Name prefixes of trained parameters this configuration leaves unused (no gradient).
    unused: tuple[str, ...] = ()


def params_yaml_cases() -> list[Case]:
    """Every experiment of params.yaml (its options, precision and network kind)."""
    params = load_params(ROOT / "params.yaml")
    return [
        Case(
            f"params.yaml:{name}",
            experiment.algorithm,
            experiment.options.model_dump(),
            params.train_config(name).precision,
            experiment.model.name,
            experiment.model.downsample,
        )
        for name, experiment in params.experiments.items()
    ]


# Code paths the params.yaml experiments leave out.
EXTRA_CASES = [
    Case("maml-loop", "maml", {"vectorise_tasks": False}),
    Case("maml-loop-dropout", "maml", {"vectorise_tasks": False, "task_dropout_rates": RATES}),
    Case("maml-channels-first", "maml", {"channels_last": False, "task_chunk_size": 1}),
    Case("maml-loop-bf16", "maml", {"vectorise_tasks": False}, "bf16", downsample="stride"),
    Case("maml-head-only-outer", "maml", {"outer_trainable": "head", "head_init": "zeros"}),
    Case("metasgd-loop", "maml", {"inner_lr_mode": "per_parameter", "vectorise_tasks": False}),
    Case(
        "mamlpp-second-order",
        "maml",
        {
            "inner_steps": 2,
            "inner_lr_mode": "per_layer_per_step",
            "multi_step_loss": True,
            "per_step_batchnorm": True,
            "first_order_until_iteration": 1,
        },
        downsample="stride",
        iteration=1,
    ),
    Case("anil-loop", "maml", {"adapt_parameters": "head", "vectorise_tasks": False}),
    Case("maml-learned-noise", "maml", {"learned_noise": True, "learned_noise_test_samples": 2}),
    Case(
        "maml-learned-noise-loop-bf16",
        "maml",
        {"learned_noise": True, "vectorise_tasks": False, "learned_noise_train_samples": 2},
        "bf16",
        downsample="stride",
    ),
    Case(
        "anil-learned-noise",
        "maml",
        {"adapt_parameters": "head", "learned_noise": True, "learned_noise_test_samples": 2},
    ),
    Case(
        "anil-metasgd-dropout-bf16",
        "maml",
        {"adapt_parameters": "head", "inner_lr_mode": "per_parameter", "task_dropout_rates": RATES},
        "bf16",
    ),
    Case(
        "taml-entropy-adapted-loop",
        "taml",
        {"variant": "entropy", "adapted_entropy_weight": 0.1, "vectorise_tasks": False},
    ),
    Case("taml-gini", "taml", {"variant": "inequality", "inequality": "gini"}),
    Case("taml-entropy-learned-noise", "taml", {"variant": "entropy", "learned_noise": True}),
    Case("taml-theil-learned-noise", "taml", {"variant": "inequality", "learned_noise": True}),
    Case(
        "taml-ge-dropout",
        "taml",
        {
            "variant": "inequality",
            "inequality": "generalized_entropy",
            "generalized_entropy_alpha": 0.0,
            "task_dropout_rates": RATES,
        },
    ),
    Case(
        "anil-task-encoder-dropout-multistep",
        "anil_task_encoder",
        {
            "task_dropout_rates": RATES,
            "multi_step_loss": True,
            "inner_steps": 2,
            "first_order": True,
        },
    ),
    Case("anil-task-encoder-loop-bf16", "anil_task_encoder", {"vectorise_tasks": False}, "bf16"),
    Case(
        "reptile-sgd-batches-nontransductive",
        "reptile",
        {
            "inner_optimizer": "sgd",
            "inner_steps": 3,
            "inner_batch_size": 2,
            "test_inner_steps": 2,
            "transductive_eval": False,
            "head_init": "random",
        },
    ),
    Case("reptile-bf16", "reptile", {"inner_steps": 2, "test_inner_steps": 2}, "bf16"),
    Case(
        "reptile-carried-adam-minibatches",
        "reptile",
        {"carry_inner_adam_state": True, "inner_steps": 2, "inner_batch_size": 4},
    ),
    Case("cavia-first-order", "cavia", {"first_order": True}),
    Case("cavia-bf16", "cavia", {}, "bf16", downsample="stride"),
    Case("protonets-bf16", "protonets", {"task_dropout_rates": RATES}, "bf16"),
    Case(
        "generated-head-first-order-slow-hidden",
        "generated_head",
        {"second_order": False, "task_fast_weights": False},
        unused=("task_generator.",),
    ),
    Case("generated-head-bf16", "generated_head", {}, "bf16"),
    Case(
        "film-prototypes-euclidean",
        "film_prototypes",
        {"similarity": "squared_euclidean", "task_dropout_rates": RATES},
        unused=("log_temperature",),
    ),
    Case("film-prototypes-fixed-temperature", "film_prototypes", {"learn_temperature": False}),
    Case(
        "leo-first-order-frozen-body",
        "leo",
        {"first_order": True, "train_body": False, "learn_inner_lrs": False},
    ),
    Case("leo-feature-dropout", "leo", {"feature_dropout": 0.3}),
    Case("leo-bf16", "leo", {"inner_steps": 2, "finetune_steps": 2}, "bf16"),
    Case("meta-networks", "meta_networks", {"conv_layers": 3}),
    Case(
        "meta-networks-cross-entropy-second-order",
        "meta_networks",
        {"conv_layers": 3, "representation_loss": "cross_entropy", "second_order": True},
    ),
    # First order: u's softmax layer only shapes the (constant) gradients d reads.
    Case(
        "meta-networks-cross-entropy",
        "meta_networks",
        {
            "conv_layers": 3,
            "representation_loss": "cross_entropy",
            "gradient_preprocessing_k": None,
        },
        unused=("representation.fc.1",),
    ),
]
CASES = params_yaml_cases() + EXTRA_CASES


def case_params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.name) for case in cases]


def build(case: Case) -> MetaLearner:
    """The case's learner, seeded, on the CPU (as the trainer builds it)."""
    torch.manual_seed(0)
    context = BuildContext(
        model=ModelConfig(name=case.model, hidden=8, downsample=case.downsample),
        n_way=N_WAY,
        image_size=IMAGE_SIZE,
        precision=case.precision,
    )
    options = options_class(case.algorithm).model_validate(case.options)
    return build_learner(case.algorithm, options, context)


def make_episodes(n_way: int, device: torch.device | str, tasks: int = TASKS) -> Episodes:
    """Random class-major tasks on ``device``: support_x [T, N*K, 1, S, S], support_y
    [T, N*K], query_x [T, N*Q, 1, S, S], query_y [T, N*Q]."""
    generator = torch.Generator().manual_seed(0)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(n_way).repeat_interleave(per_class).repeat(tasks, 1)

    def images(count: int) -> torch.Tensor:
        return torch.rand(tasks, count, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    episodes = Episodes(
        images(n_way * K_SHOT), labels(K_SHOT), images(n_way * QUERIES), labels(QUERIES)
    )
    return episodes.to(device)


def train_n_way(learner: MetaLearner) -> int:
    return learner.train_n_way or N_WAY


def trained_parameters(learner: MetaLearner, case: Case) -> dict[str, torch.nn.Parameter]:
    """The parameters the trainer's optimizer steps at ``case.iteration`` (nonzero lr),
    without those the configuration leaves unused, by name."""
    in_groups = {
        id(p)
        for group in learner.parameter_groups()
        if case.iteration >= group.get("warmup_iterations", 0)
        for p in group["params"]
    }
    return {
        name: p
        for name, p in learner.named_parameters()
        if id(p) in in_groups and not name.startswith(case.unused)
    }


class MetaHostReads:
    """Placeholders for host reads of meta tensors (they hold no value): integers read
    the labels' largest value (``label_max``), so that way counts and label checks see
    labels 0..label_max; floats (logged statistics) read NaN; bools read False."""

    def __init__(self) -> None:
        self.label_max = 0

    def value(self, tensor: torch.Tensor) -> bool | int | float:
        if tensor.dtype == torch.bool:
            return False
        if tensor.dtype.is_floating_point:
            return float("nan")
        return self.label_max


@pytest.fixture
def meta_host_reads(monkeypatch: pytest.MonkeyPatch) -> MetaHostReads:
    """Host reads of meta tensors answer `MetaHostReads` placeholders; `class_means`
    (boolean-mask rows: no meta kernel) is the same mean through a one-hot matrix."""
    reads = MetaHostReads()

    def on_meta(read: Callable[[torch.Tensor], Any], cast: type) -> Callable[..., Any]:
        def patched(tensor: torch.Tensor) -> Any:
            if tensor.device.type == "meta":
                return cast(reads.value(tensor))
            return read(tensor)

        return patched

    monkeypatch.setattr(torch.Tensor, "item", on_meta(torch.Tensor.item, lambda v: v))
    for dunder, cast in (("__float__", float), ("__int__", int), ("__bool__", bool)):
        monkeypatch.setattr(torch.Tensor, dunder, on_meta(getattr(torch.Tensor, dunder), cast))

    def one_hot_class_means(
        embeddings: torch.Tensor, labels: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        one_hot = F.one_hot(labels, n_way).to(embeddings.dtype)  # [S, N]
        return one_hot.T @ embeddings / one_hot.sum(dim=0).unsqueeze(1)

    for module in (embedding, protonets, generated_head, film_prototypes, leo):
        if hasattr(module, "class_means"):
            monkeypatch.setattr(module, "class_means", one_hot_class_means)
    return reads


def run_on(
    learner: MetaLearner,
    case: Case,
    device: torch.device,
    reads: MetaHostReads | None = None,
    default_device: torch.device | None = None,
) -> tuple[StepStats, dict[int, torch.Tensor]]:
    """Meta-gradients of a meta-batch, then adaptation to one task of the trained way count
    and one of `OTHER_WAY` ways, all on ``device`` (the learner's calls with torch's default
    device set to ``default_device``, if given). Returns the stats and, per way count, the
    predictor's query logits [N*Q, N]."""
    ways = train_n_way(learner)
    episodes = make_episodes(ways, device)
    tasks = {n_way: make_episodes(n_way, device, tasks=1) for n_way in (N_WAY, OTHER_WAY)}
    # Two adaptation steps run every line a longer adaptation runs (keeps the tests fast).
    default_steps = learner.default_adaptation_steps
    adapt_steps = None if default_steps is None else min(default_steps, 2)
    logits = {}
    with nullcontext() if default_device is None else default_device:
        if reads is not None:
            reads.label_max = ways - 1
        stats = learner.meta_gradients(episodes, TrainProgress(case.iteration, 10))
        for n_way, task in tasks.items():
            if reads is not None:
                reads.label_max = n_way - 1
            predictor = learner.adapt(task.support_x[0], task.support_y[0], adapt_steps)
            logits[n_way] = predictor(task.query_x[0])
    return stats, logits


def check_gradients_and_logits(
    learner: MetaLearner, case: Case, logits: dict[int, torch.Tensor], device: torch.device
) -> None:
    trained = trained_parameters(learner, case)
    assert trained, "no trained parameters"
    missing = [name for name, p in trained.items() if p.grad is None]
    assert not missing, f"no meta-gradient for {missing}"
    misplaced = {
        name: p.grad.device
        for name, p in learner.named_parameters()
        if p.grad is not None and p.grad.device != device
    }
    assert not misplaced, f"gradients not on {device}: {misplaced}"
    for n_way, query_logits in logits.items():
        assert query_logits.device == device
        assert query_logits.shape == (n_way * QUERIES, n_way)
        assert query_logits.dtype == torch.float32


def test_cases_cover_every_registered_algorithm() -> None:
    covered = {case.algorithm for case in CASES}
    assert covered == set(ALGORITHMS)
    assert {"fp32", "bf16"} <= {case.precision for case in CASES}


class AutocastRecorder:
    """Stands in for ``torch.autocast`` in `precision`: records (device_type, enabled) and
    autocasts as ``torch.autocast`` does, except on meta (no meta autocast: fp32)."""

    calls: list[tuple[str, bool]] = []
    real = torch.autocast

    def __init__(self, device_type: str, enabled: bool = True, **kwargs: Any) -> None:
        self.calls.append((device_type, enabled))
        self.context: AbstractContextManager = nullcontext()
        if device_type != "meta":
            self.context = self.real(device_type, enabled=enabled, **kwargs)

    def __enter__(self) -> None:
        self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.context.__exit__(*exc)


@pytest.fixture
def autocast_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """The (device_type, enabled) of every autocast region `precision` opens, meta
    included (as for CUDA, so that a region named "cpu" around meta tensors shows)."""
    monkeypatch.setattr(precision, "AUTOCAST_DEVICE_TYPES", frozenset({"cpu", "cuda", "meta"}))
    monkeypatch.setattr(AutocastRecorder, "calls", [])
    monkeypatch.setattr(precision.torch, "autocast", AutocastRecorder)
    return AutocastRecorder.calls


@pytest.mark.parametrize("case", case_params(CASES))
def test_meta_gradients_and_adaptation_stay_on_the_meta_device(
    case: Case, meta_host_reads: MetaHostReads, autocast_calls: list[tuple[str, bool]]
) -> None:
    """A learner moved to ``meta`` trains and adapts there; a CPU tensor anywhere on the
    way fails. Every autocast region (bf16 forward passes, full-precision statistics) is
    opened for the device type of its tensors, so bf16 means bf16 on a GPU too."""
    learner = build(case).to(META)
    stats, logits = run_on(learner, case, META, meta_host_reads)
    assert isinstance(stats.loss, float) and isinstance(stats.accuracy, float)
    check_gradients_and_logits(learner, case, logits, META)
    assert {device_type for device_type, _ in autocast_calls} == {"meta"}
    assert any(enabled for _, enabled in autocast_calls) == (case.precision == "bf16")


@pytest.mark.parametrize(
    "case",
    case_params(
        [
            c
            for c in CASES
            if c.algorithm
            in ("protonets", "generated_head", "film_prototypes", "leo", "meta_networks")
        ]
    ),
)
def test_cpu_run_creates_no_tensor_on_the_default_device(case: Case) -> None:
    """The real code with real values (class_means, label checks, statistics), on CPU data
    with ``meta`` as torch's default device: a factory call without ``device=`` makes a
    meta tensor, which fails against the CPU tensors or shows up in the results."""
    learner = build(case)
    stats, logits = run_on(learner, case, torch.device("cpu"), default_device=META)
    assert stats.loss == stats.loss  # not NaN: real numbers
    check_gradients_and_logits(learner, case, logits, torch.device("cpu"))


def test_task_threads_run_only_on_the_cpu(
    meta_host_reads: MetaHostReads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of tasks go to worker threads only on the CPU; elsewhere they run in the
    calling thread (the torch thread count is the CPU's)."""
    torch.set_num_threads(2)  # the autouse fixture restores the count
    runner = TaskRunner(chunk_size=1, task_parallel=True)
    assert runner.workers(4, "cpu") == 2
    assert runner.workers(4, torch.device("cuda", 0)) == 1
    assert runner.workers(4, META) == 1

    def no_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("task threads used off the CPU")

    monkeypatch.setattr(task_runner, "run_chunks_in_threads", no_threads)
    case = Case("maml-chunks", "maml", {"task_chunk_size": 1})
    learner = build(case).to(META)
    stats, logits = run_on(learner, case, META, meta_host_reads)
    check_gradients_and_logits(learner, case, logits, META)


def test_dropout_masks_draw_the_same_numbers_for_every_device() -> None:
    """Masks come from the CPU generator and are then moved: the same random numbers are
    drawn whatever the masks' device (so the CPU's committed results stay as they were)."""
    shapes, rates = [(4, 3, 3), (2, 2, 2)], [0.3, 0.5]
    torch.manual_seed(0)
    on_cpu = draw_dropout_masks(shapes, rates)
    after_cpu = torch.get_rng_state()
    torch.manual_seed(0)
    on_meta = draw_dropout_masks(shapes, rates, device=META)
    assert torch.equal(torch.get_rng_state(), after_cpu)
    for cpu_mask, meta_mask in zip(on_cpu, on_meta, strict=True):
        assert cpu_mask.device.type == "cpu" and meta_mask.device == META
        assert meta_mask.shape == cpu_mask.shape and meta_mask.dtype == cpu_mask.dtype
    generator = torch.Generator().manual_seed(1)
    (from_generator,) = draw_dropout_masks([(5,)], [0.5], generator, device=META)
    assert from_generator.device == META


def test_precision_autocasts_only_where_bf16_autocast_exists(
    meta_host_reads: MetaHostReads,
) -> None:
    """bf16 autocasts on the CPU; on meta (no autocast there) a bf16 learner runs in fp32."""
    with precision.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        with precision.full_precision("cpu"):
            assert not torch.is_autocast_enabled("cpu")
    with precision.autocast("bf16", "meta"), precision.full_precision("meta"):
        assert not torch.is_autocast_enabled("cpu")
    case = Case("maml-bf16", "maml", {"task_chunk_size": 1}, "bf16", downsample="stride")
    learner = build(case).to(META)
    _, logits = run_on(learner, case, META, meta_host_reads)
    check_gradients_and_logits(learner, case, logits, META)


def compare_with_cpu(case: Case, device: torch.device) -> None:
    """Meta-gradients, statistics and adapted logits of the case's learner on ``device``
    equal the CPU's (same start, same episodes, same seed for the random draws)."""
    cpu_learner = build(case)
    device_learner = copy.deepcopy(cpu_learner).to(device)
    torch.manual_seed(1)
    cpu_stats, cpu_logits = run_on(cpu_learner, case, torch.device("cpu"))
    torch.manual_seed(1)
    device_stats, device_logits = run_on(device_learner, case, device)

    def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(
            actual.cpu(), expected, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=what
        )

    assert device_stats.loss == pytest.approx(cpu_stats.loss, rel=1e-4, abs=1e-6)
    cpu_parameters = dict(cpu_learner.named_parameters())
    for name, p in device_learner.named_parameters():
        expected = cpu_parameters[name].grad
        assert (p.grad is None) == (expected is None), name
        if expected is not None:
            assert p.grad.device == device
            assert_close(p.grad, expected, f"meta-gradient of {name}")
    for n_way, expected in cpu_logits.items():
        assert_close(device_logits[n_way], expected, f"{n_way}-way logits")


# Numbers compared in fp32; LEO's feature dropout draws from the device's own RNG.
CUDA_CASES = [c for c in CASES if c.precision == "fp32" and not c.options.get("feature_dropout", 0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", case_params(CUDA_CASES))
def test_cuda_meta_gradients_match_the_cpu(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (fp32, TF32 off) a learner computes the CPU's meta-gradients and logits."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    compare_with_cpu(case, torch.device("cuda"))
