"""metalab's meta-training step against learn2learn and a torch.func MAML, side by side.

    python benchmarks/peers.py [--quick] [--rounds N] [--threads T] [--bf16] [--configs ...]

For each configuration the default experiments train (read from params.yaml), every
contender is built on the same weights and the same random meta-batch, all in ONE process:

1. **Gradient check** (float64, on a meta-batch of 2 tasks of the config's shapes, one
   vectorised chunk): each contender's meta-gradient is compared with metalab's plain
   per-task loop on the same weights and tasks. The error is the largest over parameter
   tensors of ||g - g_loop|| / max(||g_loop||, 1e-3 ||all of g_loop||) (the floor keeps
   tensors whose true gradient is 0, such as a conv bias before BatchNorm, from dividing
   rounding noise by rounding noise). A contender above 1e-10 is reported as disagreeing
   and is not timed. A bf16 contender computes in float64 exactly what its fp32 twin does
   (autocast leaves float64 alone), so it takes the twin's result; where it is timed, its
   float32 meta-gradient is also compared with the fp32 loop's (``bf16_rel_error``).
2. **Paired rounds** (default 5, after 1 warmup iteration each): each round times one
   meta-iteration (zero_grad + meta-gradient + Adam step) of every contender, in an order
   rotating from round to round, so that the shared machine's slow spells hit all
   contenders of a round alike. Reported: median tasks/s and the median and quartiles of
   the per-round ratios baseline time / contender time (> 1: faster than the baseline).

The baseline is learn2learn (``learn2learn.algorithms.MAML``, ``clone``/``adapt`` task by
task; ANIL: the body as a plain module and ``MAML`` around the head), or metalab's loop
when learn2learn is not installed (the reason is printed and recorded) or offers no
learner for the configuration (ProtoNets). Contenders:

    learn2learn          fp32, the baseline
    torch.func           fp32, written here: functional_call + grad for the inner loop,
                         vmap over the tasks of the meta-batch, the outer gradient by
                         backward() (as torch's own MAML example), BatchNorm from
                         elementary ops; ProtoNets: vmap of a prototypical loss
    torch.func native BN the same with nn.BatchNorm2d, as torch's example: checked, never
                         timed. Its second-order meta-gradients are wrong (torch.func's
                         batching rule for the batch-norm backward, pytorch/functorch#534,
                         still in torch 2.14.1); first order and ANIL agree
    plain                ProtoNets only: a plain PyTorch per-task loop written here
    metalab loop         the plain per-task loop (vectorise_tasks: false, NCHW)
    metalab vectorised   the default fast path (grouped convolutions, chunks of 2 tasks,
                         channels_last, task_parallel with several threads), fp32 and bf16

Configurations (28x28, Conv4 with 64 channels, each experiment's ways, shots, queries,
meta-batch, inner lr and inner steps): ``maml`` (stride-2 Conv4, second order, 1 step,
5-way 1-shot, 15 queries, 16 tasks), ``fomaml`` (first order), ``anil_s1`` (max-pool
Conv4, head-only inner loop, 5 steps, second order), ``anil_s2`` (first order),
``protonets`` (20-way 1-shot, 2 tasks, no inner loop), and ``C1`` (max-pool Conv4,
second order, 1 step, 32 tasks: benchmarks/throughput.py's config, for continuity).
``--quick`` cuts meta-batches to 4 tasks and runs 3 rounds (about 2 minutes here).

Threads: ``train.threads`` of params.yaml by default (1: the experiments train one thread
each, two side by side). bf16 autocast pays only on CPUs with AMX or AVX512-BF16; the
CPU's model and flags are recorded, and where bf16 is emulated its contenders are
gradient-checked but timed only with ``--bf16`` (emulated bf16 is several times slower
than fp32 and would dominate the run). Results: a printed table and
benchmarks/results/peers.json (with the load average around each config's rounds, and
the commit and uncommitted metalab sources measured).

learn2learn 0.2.0 is optional, and its sdist's generated C files do not build on Python
3.11. What worked (only the package registries are reachable; torch stays at the pinned
2.14.1, check ``pip list`` after):

    pip download learn2learn==0.2.0 --no-deps --no-binary :all:
    tar xzf learn2learn-0.2.0.tar.gz && cd learn2learn-0.2.0
    pip install Cython
    rm learn2learn/data/*.c && cython -3 learn2learn/data/*.pyx   # regenerate the C files
    pip install --no-deps --no-build-isolation .
    pip install requests tqdm gym scipy                            # what its import needs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from op_profile import convolution_bound, print_profiles, profile_paired  # noqa: E402
from throughput import cpu_description, print_table  # noqa: E402

from metalab.algorithms import protonets  # noqa: E402
from metalab.algorithms.base import BuildContext, TrainProgress  # noqa: E402
from metalab.algorithms.maml import MAMLLearner  # noqa: E402
from metalab.algorithms.maml import Options as MAMLOptions  # noqa: E402
from metalab.algorithms.precision import cpu_has_native_bf16  # noqa: E402
from metalab.data.episodes import Episodes  # noqa: E402
from metalab.io import write_json  # noqa: E402
from metalab.models import Conv4  # noqa: E402
from metalab.models.config import ModelConfig  # noqa: E402
from metalab.params import load_params  # noqa: E402
from metalab.runtime import keep_freed_memory, max_rss_mb  # noqa: E402

IMAGE_SIZE = 28
#: The experiments of params.yaml measured here (their model, options and meta-batch).
EXPERIMENTS = ("maml", "fomaml", "anil_s1", "anil_s2", "protonets")
#: Float64 meta-gradients must agree with metalab's loop to this relative error.
GRADIENT_TOLERANCE = 1e-10
#: Per-tensor errors are relative to max(||tensor||, this x ||whole gradient||).
RELATIVE_FLOOR = 1e-3
#: Tasks of the float64 gradient check's meta-batch (one vectorised chunk of 2).
CHECK_TASKS = 2
ROUNDS, QUICK_ROUNDS, QUICK_TASKS, WARMUP = 5, 3, 4, 1
Precision = Literal["fp32", "bf16"]
#: Tensors by parameter name (``body.0.0.weight``, ..., ``head.bias``).
ParameterDict = dict[str, Tensor]


# ------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class Config:
    """One meta-training configuration: tasks of ``n_way`` ways, ``k_shot`` support and
    ``queries`` query images per class, ``tasks`` per meta-batch, a Conv4 (``downsample``
    ``stride`` or ``maxpool``, ``hidden`` channels) on 28x28 images."""

    name: str
    description: str
    algorithm: Literal["maml", "protonets"]
    downsample: Literal["stride", "maxpool"]
    n_way: int
    k_shot: int
    queries: int
    tasks: int
    inner_steps: int = 0
    inner_lr: float = 0.0
    first_order: bool = False
    head_only: bool = False
    hidden: int = 64


def configs_from_params(path: Path = ROOT / "params.yaml") -> list[Config]:
    """`EXPERIMENTS` as params.yaml trains them, then ``C1`` (benchmarks/throughput.py's
    max-pool MAML config, 32 tasks) for continuity."""
    params = load_params(path)
    configs = []
    for name in EXPERIMENTS:
        experiment, train = params.experiment(name), params.train_config(name)
        options, model = experiment.options, experiment.model
        if model.name != "conv4":
            raise ValueError(f"{name}: only Conv4 experiments are measured, not {model.name}")
        common = {
            "name": name,
            "description": experiment.description,
            "downsample": model.downsample,
            "hidden": model.hidden,
            "k_shot": train.k_shot,
            "queries": train.query_per_class,
            "tasks": train.meta_batch_size,
        }
        if experiment.algorithm == "protonets":
            n_way = options.train_n_way or train.n_way
            configs.append(Config(algorithm="protonets", n_way=n_way, **common))
            continue
        plain = MAMLOptions(
            inner_lr=options.inner_lr,
            inner_steps=options.inner_steps,
            first_order=options.first_order,
            adapt_parameters=options.adapt_parameters,
        )
        variant = {"test_inner_steps", "vectorise_tasks", "task_chunk_size", "channels_last"}
        if options.model_dump(exclude=variant) != plain.model_dump(exclude=variant):
            raise ValueError(f"{name}: options beyond plain MAML/ANIL are not compared here")
        configs.append(
            Config(
                algorithm="maml",
                n_way=train.n_way,
                inner_steps=options.inner_steps,
                inner_lr=options.inner_lr,
                first_order=options.first_order,
                head_only=options.adapt_parameters == "head",
                **common,
            )
        )
    configs.append(
        Config(
            name="C1",
            description="throughput.py's C1: max-pool Conv4 MAML, second order, 1 step",
            algorithm="maml",
            downsample="maxpool",
            n_way=5,
            k_shot=1,
            queries=15,
            tasks=32,
            inner_steps=1,
            inner_lr=0.4,
        )
    )
    return configs


def make_model(config: Config, seed: int = 0) -> Conv4:
    """The config's Conv4 with seeded weights; ProtoNets' has no head (an identity)."""
    torch.manual_seed(seed)
    model = Conv4(config.n_way, IMAGE_SIZE, hidden=config.hidden, downsample=config.downsample)
    if config.algorithm == "protonets":
        model.head = nn.Identity()
    return model


def random_episodes(config: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Episodes:
    """A meta-batch of ``config.tasks`` random tasks: binary images with Omniglot-like ink
    density (~20%), labels class-major. support_x [T, N*K, 1, 28, 28], query_x
    [T, N*Q, 1, 28, 28] in ``dtype``; labels int64 [T, N*K] and [T, N*Q]."""
    generator = torch.Generator().manual_seed(seed)

    def images(count: int) -> Tensor:
        shape = (config.tasks, count, 1, IMAGE_SIZE, IMAGE_SIZE)
        return (torch.rand(shape, generator=generator) < 0.2).to(dtype)

    def labels(per_class: int) -> Tensor:
        return torch.arange(config.n_way).repeat_interleave(per_class).repeat(config.tasks, 1)

    n_support, n_query = config.n_way * config.k_shot, config.n_way * config.queries
    return Episodes(
        images(n_support), labels(config.k_shot), images(n_query), labels(config.queries)
    )


# ---------------------------------------------------------------------- contenders
class Contender:
    """One implementation of a config's meta-training step on its own copy of the weights.

    ``model`` is the network whose parameters receive the meta-gradient (names as in
    `Conv4`); `meta_gradients` adds the gradient of the mean query loss over the
    meta-batch to their ``.grad``; `parameters` are what the outer optimizer updates.
    """

    def __init__(self, config: Config, model: Conv4) -> None:
        self.config = config
        self.model = model

    def meta_gradients(self, episodes: Episodes) -> None:
        """Add d(mean query loss)/d(meta-parameters) to their ``.grad``. ``episodes``:
        support_x [T, N*K, 1, 28, 28], support_y [T, N*K], query_x [T, N*Q, 1, 28, 28],
        query_y [T, N*Q], images in the parameters' dtype."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter] | list[dict]:
        return list(self.model.parameters())


class MetalabMAML(Contender):
    """metalab's `MAMLLearner`: the per-task loop or the default vectorised path."""

    def __init__(
        self, config: Config, model: Conv4, vectorised: bool, precision: Precision
    ) -> None:
        super().__init__(config, model)
        fast_path = {} if vectorised else {"vectorise_tasks": False, "channels_last": False}
        options = MAMLOptions(
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            first_order=config.first_order,
            adapt_parameters="head" if config.head_only else "all",
            **fast_path,
        )
        with warnings.catch_warnings():  # bf16 without AMX: the table says so
            warnings.simplefilter("ignore")
            self.learner = MAMLLearner(model, config.n_way, options, precision=precision)

    def meta_gradients(self, episodes: Episodes) -> None:
        self.learner.meta_gradients(episodes, TrainProgress(0, 1))

    def parameters(self) -> list[dict]:
        return self.learner.parameter_groups()


class MetalabProtoNets(Contender):
    """metalab's `PrototypicalNetwork` (a per-task loop) on ``model``'s body weights."""

    def __init__(self, config: Config, model: Conv4, precision: Precision) -> None:
        options = protonets.Options(train_n_way=config.n_way)
        model_config = ModelConfig(hidden=config.hidden, downsample=config.downsample)
        context = BuildContext(model_config, config.n_way, IMAGE_SIZE, precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.learner = protonets.build(options, context)
        network = self.learner.embedding.network.to(next(model.parameters()).dtype)
        network.load_state_dict(model.state_dict())
        super().__init__(config, network)

    def meta_gradients(self, episodes: Episodes) -> None:
        self.learner.meta_gradients(episodes, TrainProgress(0, 1))


class LearnToLearnMAML(Contender):
    """learn2learn's MAML, as its examples use it: per task ``clone()``, ``adapt()`` on the
    support loss for each inner step, then backward of the query loss / T. ANIL: the body
    is an ordinary module run once per task and split, ``MAML`` wraps only the head."""

    def __init__(self, config: Config, model: Conv4, learn2learn: ModuleType) -> None:
        super().__init__(config, model)
        wrapped = model.head if config.head_only else model
        self.maml = learn2learn.algorithms.MAML(
            wrapped, lr=config.inner_lr, first_order=config.first_order
        )

    def meta_gradients(self, episodes: Episodes) -> None:
        num_tasks = episodes.num_tasks
        for task in range(num_tasks):
            support_x, query_x = episodes.support_x[task], episodes.query_x[task]
            if self.config.head_only:
                support_x = self.model.features(support_x)
                query_x = self.model.features(query_x)
            learner = self.maml.clone()
            for _ in range(self.config.inner_steps):
                learner.adapt(F.cross_entropy(learner(support_x), episodes.support_y[task]))
            loss = F.cross_entropy(learner(query_x), episodes.query_y[task])
            (loss / num_tasks).backward()


def _detached(params: ParameterDict) -> ParameterDict:
    """The same tensors cut off from every autograd graph (first-order inner gradients)."""
    return {name: p.detach() for name, p in params.items()}


class BatchNormByOps(nn.Module):
    """Training-mode BatchNorm2d from elementary ops: x [B, C, H, W] normalised with its own
    per-channel mean and (biased) variance over (B, H, W), then ``weight`` [C] and ``bias``
    [C] (the same parameter names as ``nn.BatchNorm2d``).

    Under ``vmap``, torch.func's batching rule for the native batch-norm backward gives
    wrong second derivatives with respect to the input (pytorch/functorch#534, still so in
    torch 2.14.1: measured by `gradient_check`), so second-order MAML through
    ``F.batch_norm`` under vmap is not MAML; the double backward of these ops is correct.
    """

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())
        self.eps = norm.eps

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


class TorchFuncMAML(Contender):
    """MAML / ANIL with torch.func, written here: the inner loop takes ``grad`` of a
    ``functional_call`` of the network, ``vmap`` runs it over the tasks of the meta-batch
    (all at once), and the outer gradient is ``backward()`` of the mean query loss.

    Second order: the inner gradients stay differentiable (torch.func.grad composes with
    autograd). First order: each inner gradient is taken at detached weights (and, for
    ANIL, detached features), so it is a constant for the outer gradient.

    The network called is a copy of ``model`` with every BatchNorm replaced by
    `BatchNormByOps` (same function, same parameter names; the weights passed to
    ``functional_call`` are ``model``'s own), unless ``native_batch_norm``, which keeps
    ``nn.BatchNorm2d`` as torch's MAML example does (wrong second-order meta-gradients
    under vmap, see `BatchNormByOps`).
    """

    def __init__(self, config: Config, model: Conv4, native_batch_norm: bool = False) -> None:
        super().__init__(config, model)
        self.network = copy.deepcopy(model)
        if not native_batch_norm:
            for block in self.network.body:
                block[1] = BatchNormByOps(block[1])

    def _features(self, body: ParameterDict, x: Tensor) -> Tensor:
        """Body features of one task: x [B, 1, H, W] -> [B, D] with weights ``body``
        (names ``body.*``)."""
        weights = {name.removeprefix("body."): p for name, p in body.items()}
        return functional_call(self.network.body, weights, (x,)).flatten(1)

    def _full_logits(self, params: ParameterDict, x: Tensor) -> Tensor:
        """x [B, 1, H, W] -> logits [B, N] of the whole network with weights ``params``."""
        return functional_call(self.network, params, (x,))

    def task_query_loss(
        self,
        params: ParameterDict,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
    ) -> Tensor:
        """One task's query loss after the inner loop (a scalar). support_x [S, 1, H, W],
        support_y [S], query_x [Q, 1, H, W], query_y [Q]; ``params`` the meta-parameters."""
        config = self.config

        def support_loss(weights: ParameterDict, inputs: Tensor) -> Tensor:
            if config.head_only:
                logits = F.linear(inputs, weights["head.weight"], weights["head.bias"])
            else:
                logits = self._full_logits(weights, inputs)
            return F.cross_entropy(logits, support_y)

        if config.head_only:
            body = {name: p for name, p in params.items() if not name.startswith("head.")}
            support_in, query_in = self._features(body, support_x), self._features(body, query_x)
            adapted = {name: p for name, p in params.items() if name.startswith("head.")}
        else:
            support_in, query_in, adapted = support_x, query_x, params
        for _ in range(config.inner_steps):
            if config.first_order:
                gradients = grad(support_loss)(_detached(adapted), support_in.detach())
            else:
                gradients = grad(support_loss)(adapted, support_in)
            adapted = {name: p - config.inner_lr * gradients[name] for name, p in adapted.items()}
        if config.head_only:
            logits = F.linear(query_in, adapted["head.weight"], adapted["head.bias"])
        else:
            logits = self._full_logits(adapted, query_in)
        return F.cross_entropy(logits, query_y)

    def meta_gradients(self, episodes: Episodes) -> None:
        params = dict(self.model.named_parameters())
        losses = vmap(self.task_query_loss, in_dims=(None, 0, 0, 0, 0))(
            params, *episodes.tensors()
        )  # [T]
        losses.mean().backward()


def prototype_logits(
    support_features: Tensor, support_y: Tensor, query_features: Tensor, n_way: int
) -> Tensor:
    """ProtoNets logits of one task: support [S, D] with labels [S], queries [Q, D] ->
    minus squared distances to the class means [Q, n_way]. Class means by a one-hot
    product (no data-dependent shapes, so it runs under vmap)."""
    one_hot = (support_y.unsqueeze(1) == torch.arange(n_way)).to(support_features.dtype)
    prototypes = (one_hot.T @ support_features) / one_hot.sum(dim=0).unsqueeze(1)  # [N, D]
    return -(query_features.unsqueeze(1) - prototypes).pow(2).sum(dim=-1)


class TorchFuncProtoNets(Contender):
    """ProtoNets with torch.func: ``vmap`` over tasks of a prototypical loss of the
    ``functional_call``-ed body (support and query in separate passes, as metalab's
    transductive BatchNorm does), then ``backward()`` of the mean."""

    def task_loss(
        self,
        body: ParameterDict,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
    ) -> Tensor:
        """One task's query cross-entropy (a scalar); shapes as `TorchFuncMAML`."""
        weights = {name.removeprefix("body."): p for name, p in body.items()}
        support = functional_call(self.model.body, weights, (support_x,)).flatten(1)
        query = functional_call(self.model.body, weights, (query_x,)).flatten(1)
        logits = prototype_logits(support, support_y, query, self.config.n_way)
        return F.cross_entropy(logits, query_y)

    def meta_gradients(self, episodes: Episodes) -> None:
        body = dict(self.model.named_parameters())
        vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0))(
            body, *episodes.tensors()
        ).mean().backward()


class PlainProtoNets(Contender):
    """ProtoNets as a plain PyTorch loop over tasks (the module called as it is)."""

    def meta_gradients(self, episodes: Episodes) -> None:
        num_tasks = episodes.num_tasks
        for task in range(num_tasks):
            support = self.model.features(episodes.support_x[task])
            query = self.model.features(episodes.query_x[task])
            logits = prototype_logits(support, episodes.support_y[task], query, self.config.n_way)
            (F.cross_entropy(logits, episodes.query_y[task]) / num_tasks).backward()


@dataclass(frozen=True)
class Spec:
    """A contender of a config: its display ``name``, precision and how to build it on a
    copy of the reference weights."""

    name: str
    precision: Precision
    build: Callable[[Config, Conv4], Contender]
    #: False: gradient-checked only (to show a known problem), never timed.
    timed: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


METALAB_LOOP = "metalab loop"


def load_learn2learn() -> tuple[ModuleType | None, str | None]:
    """learn2learn if it imports (its import chatter on stdout/stderr is swallowed), else
    None and the reason."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module("learn2learn")
    except Exception as error:  # any import failure (also in its dependencies): skip it
        return None, f"learn2learn not importable ({type(error).__name__}: {error})"
    return module, None


def contender_specs(
    config: Config,
    learn2learn: ModuleType | None,
    learn2learn_reason: str | None,
    time_bf16: bool = True,
) -> tuple[list[Spec], dict[str, str]]:
    """The config's contenders, the baseline first, and the skipped ones with the reason.

    The baseline is learn2learn where it is installed and has a learner for the config
    (MAML and ANIL), else metalab's loop. ``time_bf16``: whether the bf16 contenders are
    timed (else only gradient-checked)."""
    skipped: dict[str, str] = {}
    if config.algorithm == "protonets":
        skipped["learn2learn fp32"] = (
            "learn2learn has no ProtoNets learner outside its optional Lightning module; "
            "its ProtoNets example is a plain PyTorch loop (the 'plain' contender)"
        )
        return [
            Spec(METALAB_LOOP, "fp32", lambda c, m: MetalabProtoNets(c, m, "fp32")),
            Spec(METALAB_LOOP, "bf16", lambda c, m: MetalabProtoNets(c, m, "bf16"), time_bf16),
            Spec("plain", "fp32", PlainProtoNets),
            Spec("torch.func", "fp32", TorchFuncProtoNets),
        ], skipped
    specs = [
        Spec(METALAB_LOOP, "fp32", lambda c, m: MetalabMAML(c, m, False, "fp32")),
        Spec("metalab vectorised", "fp32", lambda c, m: MetalabMAML(c, m, True, "fp32")),
        Spec("metalab vectorised", "bf16", lambda c, m: MetalabMAML(c, m, True, "bf16"), time_bf16),
        Spec("torch.func", "fp32", TorchFuncMAML),
        Spec("torch.func native BN", "fp32", lambda c, m: TorchFuncMAML(c, m, True), timed=False),
    ]
    if learn2learn is None:
        skipped["learn2learn fp32"] = learn2learn_reason or "learn2learn not installed"
    else:
        specs.insert(
            0, Spec("learn2learn", "fp32", lambda c, m: LearnToLearnMAML(c, m, learn2learn))
        )
    return specs, skipped


# ------------------------------------------------------------------ gradient check
def meta_gradient(contender: Contender, episodes: Episodes) -> ParameterDict:
    """The contender's meta-gradient on ``episodes`` (from zeroed grads), by name."""
    for p in contender.model.parameters():
        p.grad = None
    contender.meta_gradients(episodes)
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for name, p in contender.model.named_parameters()
    }


def max_relative_error(gradient: ParameterDict, reference: ParameterDict) -> float:
    """max over tensors of ||g - ref|| / max(||ref||, RELATIVE_FLOOR x ||all of ref||)."""
    total = math.sqrt(sum(float(r.double().pow(2).sum()) for r in reference.values()))
    floor = max(RELATIVE_FLOOR * total, torch.finfo(torch.float64).tiny)
    errors = [
        float((gradient[name].double() - ref.double()).norm())
        / max(float(ref.double().norm()), floor)
        for name, ref in reference.items()
    ]
    return max(errors)


def relative_error(gradient: ParameterDict, reference: ParameterDict) -> float:
    """||g - ref|| / ||ref|| over all tensors at once (how far bf16 is from fp32)."""
    diff = torch.cat([(gradient[n].double() - r.double()).flatten() for n, r in reference.items()])
    ref = torch.cat([r.double().flatten() for r in reference.values()])
    return float(diff.norm() / ref.norm())


def gradient_check(config: Config, specs: Sequence[Spec], tasks: int) -> dict[str, dict]:
    """Float64 meta-gradient of every spec vs metalab's loop on the same weights and a
    meta-batch of ``tasks`` tasks (seed 1, the config's shapes otherwise).

    A bf16 spec computes exactly what its fp32 twin (same name) computes in float64, since
    autocast leaves float64 alone, so it takes its twin's result; where it is timed, its
    float32 bf16 meta-gradient is also compared with the fp32 loop's (``bf16_rel_error``).
    Returns, per label, ``max_rel_error``, ``agrees`` and maybe ``bf16_rel_error``."""
    checked = replace(config, tasks=tasks)
    model64 = make_model(config).double()
    episodes64 = random_episodes(checked, seed=1, dtype=torch.float64)
    loop = next(s for s in specs if s.name == METALAB_LOOP and s.precision == "fp32")
    reference = meta_gradient(loop.build(config, copy.deepcopy(model64)), episodes64)
    reference32: ParameterDict | None = None
    results: dict[str, dict] = {loop.label: {"max_rel_error": 0.0, "agrees": True}}
    for spec in sorted(specs, key=lambda s: s.precision == "bf16"):  # fp32 twins first
        if spec is loop:
            continue
        if spec.precision == "bf16":
            result = dict(results[f"{spec.name} fp32"])
            if spec.timed:
                episodes32 = random_episodes(checked, seed=1)
                if reference32 is None:
                    reference32 = meta_gradient(loop.build(config, make_model(config)), episodes32)
                bf16 = meta_gradient(spec.build(config, make_model(config)), episodes32)
                result["bf16_rel_error"] = relative_error(bf16, reference32)
        else:
            gradient = meta_gradient(spec.build(config, copy.deepcopy(model64)), episodes64)
            error = max_relative_error(gradient, reference)
            result = {"max_rel_error": error, "agrees": error < GRADIENT_TOLERANCE}
        results[spec.label] = result
    return results


# ---------------------------------------------------------------------- timing
def make_stepper(contender: Contender, episodes: Episodes) -> Callable[[], None]:
    """One meta-iteration of the contender: zero_grad + meta-gradient + Adam step."""
    optimizer = torch.optim.Adam(contender.parameters(), lr=1e-3)

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        contender.meta_gradients(episodes)
        optimizer.step()

    return iteration


def paired_rounds(
    steppers: Sequence[Callable[[], None]], warmup: int, rounds: int
) -> list[list[float]]:
    """Seconds per meta-iteration of each stepper in each round: every round runs each
    stepper once, the order rotating by one from round to round. -> [steppers][rounds]."""
    for step in steppers:
        for _ in range(warmup):
            step()
    seconds: list[list[float]] = [[] for _ in steppers]
    for round_index in range(rounds):
        for offset in range(len(steppers)):
            which = (round_index + offset) % len(steppers)
            start = time.perf_counter()
            steppers[which]()
            seconds[which].append(time.perf_counter() - start)
    return seconds


def ratio_summary(baseline: Sequence[float], own: Sequence[float]) -> dict[str, float | list]:
    """Per-round ratios baseline time / own time (> 1: faster): median, quartiles, all."""
    ratios = [b / o for b, o in zip(baseline, own, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_q1": round(quartiles[0], 3),
        "ratio_q3": round(quartiles[-1], 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def measure_config(
    config: Config,
    specs: Sequence[Spec],
    skipped: dict[str, str],
    check_tasks: int,
    warmup: int,
    rounds: int,
    bf16_native: bool | None,
) -> list[dict]:
    """Gradient check, then paired rounds of the contenders that agree: one row each."""
    started = time.perf_counter()
    check = gradient_check(config, specs, check_tasks)
    check_seconds = time.perf_counter() - started
    timed = [spec for spec in specs if spec.timed and check[spec.label]["agrees"]]
    baseline = specs[0]
    base = {"config": config.name, "tasks": config.tasks, "baseline": baseline.label}
    rows = []
    seconds: list[list[float]] = []
    load = [os.getloadavg()[0]]
    if baseline in timed:
        episodes = random_episodes(config)
        model = make_model(config)
        steppers = [
            make_stepper(spec.build(config, copy.deepcopy(model)), episodes) for spec in timed
        ]
        seconds = paired_rounds(steppers, warmup, rounds)
        del steppers
    base["load_average_1min"] = [round(value, 2) for value in (*load, os.getloadavg()[0])]
    base["check_seconds"] = round(check_seconds, 1)
    base["timing_seconds"] = round(time.perf_counter() - started - check_seconds, 1)
    for spec in specs:
        row = {**base, "contender": spec.name, "precision": spec.precision, **check[spec.label]}
        if spec.precision == "bf16" and not bf16_native:
            row["note"] = "bf16 emulated: no AMX/AVX512-BF16"
        if not check[spec.label]["agrees"]:
            row["status"] = "gradient mismatch: not timed"
        elif not spec.timed and spec.precision == "bf16":
            row["status"] = "not timed: bf16 is emulated on this CPU (--bf16 times it)"
        elif not spec.timed:
            row["status"] = "gradient check only: not timed"
        elif not seconds:
            row["status"] = "baseline's gradient mismatch: not timed"
        else:
            times = seconds[timed.index(spec)]
            row["status"] = "timed"
            row["rounds"] = rounds
            row["tasks_per_s_median"] = round(config.tasks / statistics.median(times), 3)
            row.update(ratio_summary(seconds[0], times))
        rows.append(row)
    for label, reason in skipped.items():
        name, precision = label.rsplit(" ", 1)
        rows.append(
            {**base, "contender": name, "precision": precision, "status": f"skipped: {reason}"}
        )
    return rows


# ----------------------------------------------------------------------- targets
#: The issue's targets on the ``maml`` config: metalab vectorised over learn2learn.
MAML_TARGETS = {"fp32": 2.0, "bf16": 3.0}


def is_metalab(contender: str) -> bool:
    return contender.startswith("metalab")


def target_checks(rows: Sequence[dict], bf16_native: bool | None) -> list[dict]:
    """Each config's targets with the measured medians: metalab's fastest fp32 contender at
    least as fast as the fastest peer (every config), and on ``maml`` the vectorised path
    ``MAML_TARGETS`` times learn2learn (bf16 only where the CPU has native bf16)."""
    checks = []
    for config in dict.fromkeys(row["config"] for row in rows):
        timed = [r for r in rows if r["config"] == config and r.get("status") == "timed"]
        ours = [r for r in timed if is_metalab(r["contender"]) and r["precision"] == "fp32"]
        peers = [r for r in timed if not is_metalab(r["contender"])]
        if not ours or not peers:
            continue
        best_ours = max(ours, key=lambda r: r["ratio_median"])
        best_peer = max(peers, key=lambda r: r["ratio_median"])
        checks.append(
            {
                "config": config,
                "target": f"metalab >= fastest peer ({best_peer['contender']})",
                "measured": round(best_ours["ratio_median"] / best_peer["ratio_median"], 3),
                "required": 1.0,
            }
        )
        baseline = timed[0]["baseline"] if timed else ""
        if config != "maml" or not baseline.startswith("learn2learn"):
            continue
        for precision, required in MAML_TARGETS.items():
            if precision == "bf16" and not bf16_native:
                continue
            vectorised = [
                r
                for r in timed
                if r["contender"] == "metalab vectorised" and r["precision"] == precision
            ]
            for row in vectorised:
                checks.append(
                    {
                        "config": config,
                        "target": f"metalab vectorised {precision} >= {required}x learn2learn",
                        "measured": row["ratio_median"],
                        "required": required,
                    }
                )
    for check in checks:
        check["met"] = check["measured"] >= check["required"]
    return checks


def profile_config(config: Config, specs: Sequence[Spec]) -> dict:
    """Self CPU time by op category of the baseline and metalab's vectorised fp32 step on
    the config's meta-batch (see op_profile.py), printed, with the convolution bound."""
    chosen = [specs[0]] + [
        s for s in specs if s.name == "metalab vectorised" and s.precision == "fp32"
    ]
    episodes, model = random_episodes(config), make_model(config)
    profiles = profile_paired(
        [make_stepper(spec.build(config, copy.deepcopy(model)), episodes) for spec in chosen]
    )
    print(f"\nprofile of {config.name} (self CPU ms per meta-iteration, medians of 3):")
    print_profiles([spec.label for spec in chosen], profiles)
    result = {"contenders": [spec.label for spec in chosen], "profiles": profiles}
    if len(profiles) == 2:
        bound = convolution_bound(profiles[0], profiles[1])
        result["convolution_bound"] = round(bound, 2)
        print(
            f"{chosen[1].label}'s convolutions alone take {profiles[1]['convolution']:.0f} ms, "
            f"{chosen[0].label}'s whole step {profiles[0]['total']:.0f} ms: at most "
            f"{bound:.2f}x without faster convolution kernels"
        )
    return result


def print_targets(checks: Sequence[dict]) -> None:
    print("\ntargets (medians of paired ratios):")
    for check in checks:
        verdict = "met" if check["met"] else "NOT met"
        print(
            f"  {check['config']:<9} {check['target']:<52} {check['measured']:.2f}x "
            f"(required {check['required']:.1f}x): {verdict}"
        )


# ------------------------------------------------------------------------ output
def source_state() -> dict[str, object]:
    """The commit measured and the metalab sources that differ from it (uncommitted
    edits are measured too), or what git said when it could not tell."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return {"commit": None, "error": str(error)}
    return {"commit": commit, "uncommitted_src": [line[3:] for line in status.splitlines()]}


def table_rows(rows: Sequence[dict]) -> list[dict[str, str]]:
    """Rows as display strings for `print_table`."""
    shown = []
    for row in rows:
        timed = row["status"] == "timed"
        error = row.get("max_rel_error")
        bf16 = row.get("bf16_rel_error")
        notes = [] if timed else [row["status"][:60]]
        if "note" in row:
            notes.append(row["note"])
        if bf16 is not None:
            notes.append(f"bf16 vs fp32 grad {bf16:.1e}")
        shown.append(
            {
                "config": row["config"],
                "contender": f"{row['contender']} {row['precision']}",
                "tasks_per_s": f"{row['tasks_per_s_median']:.1f}" if timed else "-",
                "ratio": f"{row['ratio_median']:.2f}" if timed else "-",
                "quartiles": f"{row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}" if timed else "-",
                "error": "-" if error is None else f"{error:.1e}",
                "notes": "; ".join(notes),
            }
        )
    return shown


def print_results(rows: Sequence[dict]) -> None:
    print_table(
        table_rows(rows),
        [
            ("config", "config", "<9"),
            ("contender", "contender", "<23"),
            ("tasks_per_s", "tasks/s", ">7"),
            ("ratio", "x base", ">6"),
            ("quartiles", "quartiles", ">9"),
            ("error", "grad err", ">8"),
            ("notes", "notes", "<1"),
        ],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="meta-batches of at most 4 tasks, 3 rounds"
    )
    parser.add_argument("--rounds", type=int, help=f"paired rounds per config ({ROUNDS})")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: params.yaml train.threads)"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="time bf16 also where the CPU emulates it"
    )
    parser.add_argument("--configs", nargs="+", help="only these configs (names as printed)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile every config (default: only those with a target not met)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/peers.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    threads = args.threads or load_params(ROOT / "params.yaml").train.threads
    torch.set_num_threads(threads)
    keep_freed_memory()

    cpu = cpu_description()
    bf16_native = cpu_has_native_bf16()
    time_bf16 = bool(bf16_native) or args.bf16
    learn2learn, reason = load_learn2learn()
    print(
        f"CPU: {cpu['model']}; bf16 instructions: {', '.join(cpu['bf16_flags']) or 'none'}"
        f"{'' if bf16_native else ' (bf16 autocast is emulated)'}; {threads} thread(s); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"learn2learn: {learn2learn.__version__ if learn2learn else reason}", flush=True)

    configs = configs_from_params()
    if args.configs:
        configs = [c for c in configs if c.name in args.configs]
    if args.quick:
        configs = [replace(c, tasks=min(c.tasks, QUICK_TASKS)) for c in configs]
    rows: list[dict] = []
    profiles: dict[str, dict] = {}
    started = time.perf_counter()
    for config in configs:
        specs, skipped = contender_specs(config, learn2learn, reason, time_bf16)
        check_tasks = min(config.tasks, CHECK_TASKS)
        config_rows = measure_config(
            config, specs, skipped, check_tasks, WARMUP, rounds, bf16_native
        )
        rows += config_rows
        print(f"\n{config.name}: {config.description} ({config.tasks} tasks)", flush=True)
        print_results(config_rows)
        unmet = [c for c in target_checks(config_rows, bf16_native) if not c["met"]]
        if args.profile or unmet:
            profiles[config.name] = profile_config(config, specs)
    elapsed = time.perf_counter() - started
    targets = target_checks(rows, bf16_native)

    command = ["python benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)]
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(command),
        "cpu": {**cpu, "native_bf16": bf16_native},
        "threads": threads,
        "rounds": rounds,
        "warmup": WARMUP,
        "gradient_check_tasks": CHECK_TASKS,
        "gradient_tolerance": GRADIENT_TOLERANCE,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "learn2learn": learn2learn.__version__ if learn2learn else None,
        "learn2learn_skipped": reason,
        "metalab_source": source_state(),
        "seconds": round(elapsed, 1),
        "peak_rss_mb": round(max_rss_mb(), 1),
        "configs": [asdict(c) for c in configs],
        "rows": rows,
        "targets": targets,
        "profiles": profiles,
    }
    write_json(args.output, report)
    print(f"\nall configs ({elapsed / 60:.1f} min):")
    print_results(rows)
    print_targets(targets)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
