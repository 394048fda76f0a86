"""The meta-training loop shared by every learner: sampling, optimizer, schedules,
validation, checkpoints (resume), NaN guard, logging and the saved model.

A learner only turns a meta-batch into meta-gradients (`MetaLearner.meta_gradients`);
everything else lives here, once. Under torchrun the meta-batch is split across the
processes (`metalab.distributed`): every process samples the same tasks, computes the
meta-gradients of its own slice, the gradients are all-reduced and every process takes the
same step; rank 0 alone validates, logs, checkpoints and shows progress.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metalab.algorithms.base import (
    BuildContext,
    MetaLearner,
    StepStats,
    TrainProgress,
    scheduled_lr,
)
from metalab.algorithms.registry import build_learner
from metalab.checkpoints import (
    Checkpoint,
    fingerprint,
    source_digest,
    state_digest,
    tensor_digest,
)
from metalab.data.episodes import materialize, sample_episode_index
from metalab.data.prefetch import OmniglotArrays
from metalab.data.splits import Split
from metalab.device import synchronize
from metalab.distributed import (
    DistributedContext,
    RandomUse,
    all_reduce_gradients,
    all_reduce_stats,
    broadcast_buffers,
    broadcast_module,
    broadcast_object,
    check_splittable,
    current_context,
    slice_random_stream,
    threads_per_process,
)
from metalab.errors import DivergedError
from metalab.evaluation import evaluate_accuracy
from metalab.learner_api import ModelPayload, save_model
from metalab.models.pretrained import load_body_init
from metalab.params import Params, TrainConfig
from metalab.schema import ParamsError


@dataclass
class TrainResult:
    """What a finished training run reports (also written to metrics/train/<name>.json)."""

    summary: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def base_lr_at(config: TrainConfig, iteration: int) -> float:
    """Meta lr at `iteration` under the configured schedule (constant or cosine)."""
    if config.lr_schedule == "constant":
        return config.meta_lr
    floor = config.meta_lr * config.min_lr_fraction
    cosine = 0.5 * (1 + math.cos(math.pi * iteration / max(1, config.iterations)))
    return floor + (config.meta_lr - floor) * cosine


def count_parameters(learner: MetaLearner) -> tuple[int, int]:
    """(total, trainable) meta-parameters: trainable = in an optimizer group whose lr can be >0."""
    total = sum(p.numel() for p in learner.parameters())
    trainable_ids = {
        id(p)
        for group in learner.parameter_groups()
        if group.get("lr_multiplier", 1.0) > 0
        for p in group["params"]
    }
    trainable = sum(p.numel() for p in learner.parameters() if id(p) in trainable_ids)
    return total, trainable


class Trainer:
    """Meta-trains experiment `name` of `params` on `arrays` with class split `split`.

    ``distributed`` says which process of a torchrun job this is (default: the process
    group this process is in, or a single process); ``on_log`` is called on rank 0 only.
    """

    def __init__(
        self,
        name: str,
        params: Params,
        arrays: OmniglotArrays,
        split: Split,
        checkpoint_dir: Path,
        progress: bool = True,
        on_log: Callable[[dict[str, float], int], None] | None = None,
        project_root: Path = Path("."),
        distributed: DistributedContext | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.name = name
        self.device = device or torch.device("cpu")
        self.distributed = distributed or current_context()
        self.experiment = params.experiment(name)
        self.config = params.train_config(name)
        self.options = self.experiment.options
        self.arrays = arrays
        self.split = split
        self.progress = progress and self.distributed.is_main
        self.on_log = on_log or (lambda metrics, step: None)
        torch.manual_seed(self.config.seed)
        torch.set_num_threads(threads_per_process(self.config.threads, self.distributed))
        self.context = BuildContext(
            model=self.experiment.model,
            n_way=self.config.n_way,
            image_size=arrays.image_size,
            precision=self.config.precision,
            seed=self.config.seed,
        )
        self.learner = build_learner(self.experiment.algorithm, self.options, self.context)
        load_body_init(self.learner.model, self.experiment.body_init, project_root)
        # Everything the result depends on: a checkpoint of other inputs is never resumed.
        self.checkpoint = Checkpoint(
            checkpoint_dir / f"{name}.pt",
            fingerprint(
                {
                    "experiment": self.experiment.model_dump(),
                    "train": self.config.model_dump(),
                    "split": params.data.split.model_dump(),
                    "split_classes": tensor_digest(*split.parts().values()),
                    "images": tensor_digest(arrays.images),
                    "starting_weights": state_digest(self.learner.state_dict()),
                    "code": source_digest(),
                }
            ),
        )
        check_splittable(self.learner, self.config.meta_batch_size, self.distributed)
        # Built and initialised on the CPU (the same seeded weights on every device), then
        # moved; the optimizer is made after the move so its state lives there too.
        self.learner.to(self.device)
        self.optimizer = self._make_optimizer()
        self.train_n_way = self.learner.train_n_way or self.config.n_way
        # A learner may ask for other shots and queries in meta-training than validation
        # and test tasks have (Reptile's train_shots).
        self.train_k_shot = self.learner.train_k_shot or self.config.k_shot
        self.train_query_per_class = (
            self.learner.train_query_per_class or self.config.query_per_class
        )
        per_class = self.train_k_shot + self.train_query_per_class
        if per_class > arrays.drawings_per_character:
            raise ParamsError(
                f"params.yaml: experiments.{name}: meta-training tasks of "
                f"{self.train_k_shot} shots + {self.train_query_per_class} queries need "
                f"{per_class} drawings per class; each character has "
                f"{arrays.drawings_per_character} (lower train.k_shot/query_per_class or the "
                "learner's train_shots/train_query_per_class)"
            )
        self.sampler = torch.Generator().manual_seed(self.config.seed)
        validation_generator = torch.Generator().manual_seed(self.config.seed + 1)
        self.validation_index = sample_episode_index(
            split.validation,
            arrays.drawings_per_character,
            self.config.n_way,
            self.config.k_shot,
            self.config.query_per_class,
            self.config.validation_episodes,
            validation_generator,
        )
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.best_accuracy = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_iteration = -1
        self.busy_seconds = 0.0
        self._warned_about_randomness = False

    # ------------------------------------------------------------------ setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = self.learner.parameter_groups()
        kind = self.learner.outer_optimizer or self.config.optimizer
        for group in groups:
            group["lr"] = scheduled_lr(group, self._base_lr(0), 0)
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=self._base_lr(0))
        return torch.optim.Adam(groups, lr=self._base_lr(0))

    def _base_lr(self, iteration: int) -> float:
        fixed = self.learner.outer_lr  # e.g. Reptile folds epsilon into its gradients
        return fixed if fixed is not None else base_lr_at(self.config, iteration)

    # ------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.on_cuda else {}),
            "history": self.history,
            "best_accuracy": self.best_accuracy,
            "best_state": self.best_state,
            "best_iteration": self.best_iteration,
            "busy_seconds": self.busy_seconds,
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0 only: the other processes hold the same state)."""
        if self.distributed.is_main:
            self.checkpoint.save(self.state())

    def try_resume(self) -> bool:
        """Resume from the checkpoint if it belongs to this exact configuration.

        Under torchrun rank 0 reads it and sends it to every process, so all resume from
        the same state even on machines that do not share rank 0's filesystem.
        """
        state = self.checkpoint.load() if self.distributed.is_main else None
        state = broadcast_object(state)
        if state is None:
            return False
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if self.on_cuda and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.iteration = state["iteration"]
        self.history = state["history"]
        self.best_accuracy = state["best_accuracy"]
        self.best_state = state["best_state"]
        self.best_iteration = state["best_iteration"]
        self.busy_seconds = state["busy_seconds"]
        return True

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    # ------------------------------------------------------------------ loop
    def validate(self) -> float:
        self.learner.eval()
        episodes = materialize(self.arrays.images, self.validation_index).to(self.device)
        accuracy = evaluate_accuracy(self.learner, episodes)
        self.learner.train()
        return float(accuracy.mean())

    def step(self) -> dict[str, float]:
        """One meta-iteration: sample, meta-gradients, NaN guard, clip, schedule, step.

        Under torchrun every process samples the whole meta-batch (the same tasks as a
        single process, since all share the sampler's seed) but materialises and computes
        only its slice; the all-reduced gradients and statistics are the meta-batch's.
        """
        config = self.config
        distributed = self.distributed
        started = time.perf_counter()
        index = sample_episode_index(
            self.split.meta_train,
            self.arrays.drawings_per_character,
            self.train_n_way,
            self.train_k_shot,
            self.train_query_per_class,
            config.meta_batch_size,
            self.sampler,
        )
        episodes = materialize(self.arrays.images, index[distributed.task_slice(index.num_tasks)])
        episodes = episodes.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with slice_random_stream(config.seed, self.iteration, distributed) as random_use:
            stats = self.learner.meta_gradients(
                episodes, TrainProgress(self.iteration, config.iterations)
            )
        if distributed.enabled:
            weight = distributed.task_weight(index.num_tasks)
            all_reduce_gradients(self.learner.parameters(), weight)
            stats = all_reduce_stats(stats, weight)
            # No learner here updates buffers while training; if one did (e.g. BatchNorm
            # running statistics), each process would update them from its own slice, so
            # rank 0's are kept everywhere (as DistributedDataParallel does) and saved.
            broadcast_buffers(self.learner)
            self._warn_if_random(random_use)
        self._stop_if_diverged(stats)
        if config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.learner.parameters(), config.grad_clip_norm)
        base_lr = self._base_lr(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(group, base_lr, self.iteration)
        self.optimizer.step()
        self._stop_if_diverged(None)
        synchronize(self.device)  # the step's kernels may still be queued on a GPU
        self.busy_seconds += time.perf_counter() - started
        record = {
            "iteration": self.iteration,
            "loss": stats.loss,
            "accuracy": stats.accuracy,
            "lr": base_lr,
            # busy seconds of the loop up to this step (validation excluded, as the summary's
            # training_seconds): the x of the budget curves (plots/budget.png)
            "seconds": self.busy_seconds,
        }
        record.update(stats.extra or {})
        return record

    def _stop_if_diverged(self, stats: StepStats | None) -> None:
        """Raise `DivergedError` if this iteration's losses or gradients (``stats`` given,
        before the step) or the updated weights (after it) hold a NaN or an infinity. The
        checkpoint on disk is the last good one: a step that failed here is never saved."""
        if stats is not None:
            losses = {"meta-loss": stats.loss, **{k: v for k, v in (stats.extra or {}).items()}}
            bad = [
                f"{name} = {value}" for name, value in losses.items() if not math.isfinite(value)
            ]
            bad += [
                f"gradient of {name}"
                for name, parameter in self.learner.named_parameters()
                if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all())
            ]
            when = "stopped before the step"
        else:
            bad = [
                f"weights {name}"
                for name, parameter in self.learner.named_parameters()
                if not bool(torch.isfinite(parameter).all())
            ]
            when = "stopped after the step"
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise DivergedError(
                f"experiment {self.name!r}: non-finite {shown} at iteration {self.iteration}; "
                f"{when}, keeping the last good checkpoint {self.checkpoint.path} "
                "(lower train.meta_lr or the inner lr, or set train.grad_clip_norm)"
            )

    def _warn_if_random(self, random_use: RandomUse) -> None:
        """Say once (rank 0) that this learner's random draws differ from a single process."""
        if random_use.consumed and self.distributed.is_main and not self._warned_about_randomness:
            self._warned_about_randomness = True
            warnings.warn(
                f"experiment {self.name!r}: the learner draws from the global torch RNG while "
                "meta-training (e.g. task dropout masks); across processes each slice draws "
                "from its own stream seeded by (seed, iteration, rank), so this run is "
                "reproducible for the same number of processes but not bit-identical to a "
                "single-process run",
                stacklevel=2,
            )

    def run(self) -> TrainResult:
        config = self.config
        main = self.distributed.is_main
        resumed = self.try_resume()
        # Every process starts from rank 0's weights (the same seed already gives the same
        # initialisation; this guards against any process-dependent initialisation).
        broadcast_module(self.learner)
        bar = tqdm(
            total=config.iterations,
            initial=self.iteration,
            desc=f"train {self.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        if resumed and main:
            bar.write(f"resumed {self.name} from iteration {self.iteration}")
        while self.iteration < config.iterations:
            record = self.step()
            self.iteration += 1
            done = self.iteration == config.iterations
            # Validation is rank 0's alone: its tasks are fixed at start-up, and under
            # several processes training takes no randomness from the global RNG that
            # `adapt` might use (see slice_random_stream), so the processes stay in step.
            if main and (self.iteration % config.validate_every == 0 or done):
                record["validation_accuracy"] = self.validate()
                if record["validation_accuracy"] > self.best_accuracy:
                    self.best_accuracy = record["validation_accuracy"]
                    self.best_iteration = self.iteration
                    # Kept on the CPU: a copy on the GPU would cost the device memory.
                    self.best_state = {
                        k: v.detach().to("cpu", copy=True)
                        for k, v in self.learner.state_dict().items()
                    }
            self.history.append(record)
            logging_due = self.iteration % config.log_every == 0 or done
            if main and (logging_due or "validation_accuracy" in record):
                tasks_per_s = self.iteration * config.meta_batch_size / max(self.busy_seconds, 1e-9)
                self.on_log(
                    {
                        **{k: v for k, v in record.items() if k != "iteration"},
                        "tasks_per_s": tasks_per_s,
                    },
                    self.iteration,
                )
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                acc=f"{record['accuracy']:.3f}",
                val=f"{self.best_accuracy:.3f}" if self.best_accuracy >= 0 else "-",
            )
            bar.update(1)
            if self.iteration % config.checkpoint_every == 0 or done:
                self.save_checkpoint()
        bar.close()
        return TrainResult(self.summary(), self.history)

    def summary(self) -> dict[str, Any]:
        losses = [row["loss"] for row in self.history]
        total, trainable = count_parameters(self.learner)
        tasks = self.iteration * self.config.meta_batch_size
        return {
            "experiment": self.name,
            "algorithm": self.experiment.algorithm,
            "iterations": self.iteration,
            "tasks": tasks,
            "final_loss": losses[-1] if losses else None,
            "min_loss": min(losses) if losses else None,
            "final_train_accuracy": self.history[-1]["accuracy"] if self.history else None,
            "best_validation_accuracy": self.best_accuracy,
            "best_iteration": self.best_iteration,
            "training_seconds": self.busy_seconds,
            "tasks_per_s": tasks / max(self.busy_seconds, 1e-9),
            "total_parameters": total,
            "trainable_parameters": trainable,
            "parameters_per_training_task": trainable / max(tasks, 1),
            "precision": self.config.precision,
            "processes": self.distributed.world_size,
        }

    def model_payload(self) -> ModelPayload:
        """What models/<name>.pt holds: enough to rebuild the learner anywhere."""
        return ModelPayload(
            experiment=self.name,
            algorithm=self.experiment.algorithm,
            options=self.options.model_dump(),
            model=self.experiment.model.model_dump(),
            n_way=self.config.n_way,
            k_shot=self.config.k_shot,
            image_size=self.arrays.image_size,
            precision=self.config.precision,
            state_dict=self.best_state
            if self.best_state is not None
            else self.learner.state_dict(),
            best_iteration=self.best_iteration,
            validation_accuracy=self.best_accuracy,
        )

    def save_model(self, path: Path) -> None:
        save_model(path, self.model_payload())
