"""Data-parallel meta-training across processes (``torchrun``) with torch.distributed.

Every process holds the whole learner and samples the whole meta-batch of T tasks from the
same seeded generator, so all processes agree on the tasks; process r then computes the
meta-gradients of its own contiguous slice of n_r tasks only. A learner leaves the gradient
of the *mean* over the tasks it was given, so the meta-batch's gradient is

    grad = sum_r (n_r / T) * grad_r,

one weighted all-reduce; every process then takes the same optimizer step and the
parameters stay identical without ever being sent again.

The process group is set up from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for CPU
tensors, and nccl for CUDA tensors when the run is on GPUs and every rank of a machine has
its own (``LOCAL_RANK`` selects it, see `metalab.device.resolve_device`). A CPU run never
touches CUDA, even on a GPU machine. Without those variables everything here is a no-op
for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from metalab.algorithms.base import MetaLearner, StepStats


class NotSplittableError(ValueError):
    """A meta-batch cannot be split across the processes of this run."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the run: global rank among ``world_size`` processes and
    local rank among the ``local_world_size`` processes of its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """Whether more than one process shares the meta-batch."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates, logs and writes files."""
        return self.rank == 0

    def task_slice(self, num_tasks: int) -> slice:
        """This process's tasks of a meta-batch of ``num_tasks`` (see `task_slice`)."""
        return task_slice(num_tasks, self.rank, self.world_size)

    def task_weight(self, num_tasks: int) -> float:
        """n_r / T: this process's share of the meta-batch (its gradient's weight)."""
        share = self.task_slice(num_tasks)
        return (share.stop - share.start) / num_tasks


SINGLE_PROCESS = DistributedContext()


def task_slice(num_tasks: int, rank: int, world_size: int) -> slice:
    """Contiguous, near-equal share of tasks 0..num_tasks-1 for process ``rank``.

    The first ``num_tasks % world_size`` processes get one task more than the others, e.g.
    7 tasks on 3 processes: 0:3, 3:5, 5:7. Every process needs at least one task (a process
    without tasks would have no mean gradient to contribute).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if num_tasks < world_size:
        raise NotSplittableError(
            f"a meta-batch of {num_tasks} tasks cannot be split across {world_size} processes "
            "(each needs at least one task): raise train.meta_batch_size or start fewer "
            "processes"
        )
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ----------------------------------------------------------------------- process group
def environment_context(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """The context torchrun describes in the environment; a single process without it."""
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    return DistributedContext(
        rank=int(environ["RANK"]),
        world_size=world_size,
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", "1")),
    )


def default_backend(
    device: torch.device | None = None, context: DistributedContext | None = None
) -> str:
    """The process-group backend for a run on `device`: NCCL for CUDA tensors when every
    rank of the machine has a GPU of its own (gloo still carries the CPU-side statistics),
    gloo otherwise (CPU runs, or more ranks than GPUs)."""
    context = context or environment_context()
    own_gpu = (
        device is not None
        and device.type == "cuda"
        and dist.is_nccl_available()
        and context.local_world_size <= torch.cuda.device_count()
    )
    return "cpu:gloo,cuda:nccl" if own_gpu else "gloo"


def init_distributed(
    backend: str | None = None,
    timeout: timedelta | None = None,
    device: torch.device | None = None,
) -> DistributedContext:
    """Join the process group torchrun set up (env:// rendezvous); single process otherwise.

    Safe to call when the group already exists. ``timeout`` bounds how long a collective
    waits for the other processes (torch's default: 30 minutes). `device` is where this
    rank computes (`metalab.device.resolve_device` with its ``LOCAL_RANK``, already made
    current by `metalab.device.configure`); a CPU run never touches CUDA here.
    """
    context = environment_context()
    if not context.enabled or dist.is_initialized():
        return context
    dist.init_process_group(
        backend or default_backend(device, context),
        init_method="env://",
        rank=context.rank,
        world_size=context.world_size,
        **({"timeout": timeout} if timeout is not None else {}),
    )
    return context


def shutdown_distributed() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(
    backend: str | None = None,
    timeout: timedelta | None = None,
    device: torch.device | None = None,
) -> Iterator[DistributedContext]:
    """`init_distributed` for the duration of a block, then leave the group."""
    context = init_distributed(backend, timeout, device)
    try:
        yield context
    finally:
        if context.enabled:
            shutdown_distributed()


def current_context() -> DistributedContext:
    """The context of the process group this process is in, or a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE_PROCESS
    environment = environment_context()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=environment.local_rank,
        local_world_size=environment.local_world_size,
    )


def _reducing() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------- what is reduced
def all_reduce_gradients(parameters: Iterable[torch.Tensor], weight: float) -> None:
    """Replace every ``.grad`` by sum_r weight_r * grad_r over the processes, in place.

    ``weight`` is this process's n_r / T (`DistributedContext.task_weight`). A parameter
    without a gradient here counts as zero; it keeps ``.grad = None`` only if no process
    has a gradient for it (Adam skips such parameters, while a zero gradient would still
    decay its moments, so a missing gradient must not turn into a zero one). Gradients are
    packed into one flat buffer per dtype and device: one all-reduce call each. With a
    single process this only scales by ``weight``.
    """
    unique = list({id(p): p for p in parameters}.values())
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for parameter in unique:
        buckets.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for (dtype, device), bucket in buckets.items():
        flat_gradients = torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket]
        )
        if weight != 1.0:
            flat_gradients.mul_(weight)
        has_gradient = torch.tensor(
            [float(p.grad is not None) for p in bucket], dtype=dtype, device=device
        )
        # Gradients and "has a gradient" flags travel together: one call per bucket.
        packed = torch.cat([flat_gradients, has_gradient])
        if _reducing():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        gradients = packed[: flat_gradients.numel()].split([p.numel() for p in bucket])
        for parameter, gradient, present in zip(
            bucket, gradients, packed[flat_gradients.numel() :].tolist(), strict=True
        ):
            if present == 0:
                continue
            gradient = gradient.view(parameter.shape)
            if parameter.grad is None:
                parameter.grad = gradient.clone()
            else:
                parameter.grad.copy_(gradient)


def all_reduce_stats(stats: StepStats, weight: float) -> StepStats:
    """The meta-batch's step statistics from every process's slice statistics.

    Loss, accuracy and every ``extra`` value are means over a slice's tasks, so the
    meta-batch's value is sum_r weight_r * value_r (values equal on every process, such as
    a schedule's current value, stay as they are up to rounding). Every process must
    report the same ``extra`` keys. A NaN on any process makes the result NaN everywhere,
    so every process stops together.
    """
    keys = sorted(stats.extra or {})
    values = torch.tensor(
        [stats.loss, stats.accuracy, *(stats.extra[key] for key in keys)], dtype=torch.float64
    )
    values.mul_(weight)
    if _reducing():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    reduced = values.tolist()
    extra = dict(zip(keys, reduced[2:], strict=True)) if stats.extra is not None else None
    return StepStats(loss=reduced[0], accuracy=reduced[1], extra=extra)


def _broadcast_tensors(tensors: Iterable[torch.Tensor], source: int) -> None:
    for tensor in tensors:
        if tensor.is_contiguous():
            dist.broadcast(tensor.data, src=source)
        else:  # collectives need contiguous memory
            copy = tensor.detach().contiguous()
            dist.broadcast(copy, src=source)
            tensor.data.copy_(copy)


def broadcast_module(module: nn.Module, source: int = 0) -> None:
    """Give every process rank ``source``'s parameters and buffers (in place)."""
    if _reducing():
        _broadcast_tensors([*module.parameters(), *module.buffers()], source)


def broadcast_buffers(module: nn.Module, source: int = 0) -> None:
    """Give every process rank ``source``'s buffers (a no-op for modules without any)."""
    buffers = list(module.buffers())
    if buffers and _reducing():
        _broadcast_tensors(buffers, source)


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s picklable ``value`` on every process (e.g. a checkpoint read by
    rank 0 only, so that machines without a shared filesystem resume from it too)."""
    if not _reducing():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


# -------------------------------------------------------------------- what is checked
def check_splittable(
    learner: MetaLearner, meta_batch_size: int, context: DistributedContext
) -> None:
    """Raise `NotSplittableError` if this run cannot split the meta-batch across processes.

    Needs at least one task per process, and a meta-loss that is the mean of per-task
    losses: a learner that combines its tasks otherwise (a MAML subclass overriding
    ``combine_task_losses``, such as TAML's inequality terms) has a meta-gradient that is
    not a weighted sum of its slices' gradients, and would train on a wrong gradient.
    """
    if not context.enabled:
        return
    context.task_slice(meta_batch_size)
    if not learner.combines_tasks_by_mean:
        raise NotSplittableError(
            f"{type(learner).__name__} combines its tasks' losses by something other than "
            "their mean (it overrides combine_task_losses), so its meta-gradient cannot be "
            f"computed in slices across {context.world_size} processes; train it in a "
            "single process"
        )


def threads_per_process(threads: int, context: DistributedContext) -> int:
    """Intra-op threads of each process: ``train.threads`` is the budget of one machine,
    shared by the processes torchrun starts on it (at least one each)."""
    return max(1, threads // max(1, context.local_world_size))


# --------------------------------------------------------------------------- randomness
@dataclass
class RandomUse:
    """Whether the block of `slice_random_stream` drew from the global torch RNG."""

    consumed: bool = False


def slice_seed(seed: int, iteration: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (run seed, iteration, rank)."""
    state = np.random.SeedSequence([seed, iteration, rank]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextmanager
def slice_random_stream(
    seed: int, iteration: int, context: DistributedContext
) -> Iterator[RandomUse]:
    """Run a slice's meta-gradients on a global torch RNG stream of its own.

    Some learners draw per-task randomness from the global torch RNG during meta-training
    (task dropout masks, Reptile's support shuffles, LEO's latent samples). Without this,
    every process would start from the same RNG state and its first task would get the
    same draws as every other process's first task. Under several processes the block
    therefore runs on a stream seeded by (seed, iteration, rank) -- reproducible, resumable
    from any checkpoint, different per process -- and the previous global state is restored
    afterwards. Such learners are then statistically equivalent to, but not bit-identical
    with, a single-process run. A single process runs the block unchanged.
    """
    use = RandomUse()
    if not context.enabled:
        yield use
        return
    # Learners draw their random numbers from the CPU generator on every device (masks are
    # moved to the device), so only the CPU stream needs forking.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(slice_seed(seed, iteration, context.rank))
        before = torch.get_rng_state()
        yield use
        use.consumed = not torch.equal(before, torch.get_rng_state())
