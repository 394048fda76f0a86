"""Stage `train@<experiment>`: meta-train one named experiment of params.yaml; with
``--seed S`` (stage `train_seed@<experiment>-s<S>`, params.yaml `seed_runs`) the same
experiment with training seed S in place of its train.seed.

Writes models/<run>.pt (best validation weights), metrics/train/<run>.json (with its
.info.json) and plots/train/<run>.csv, <run> = <experiment> without --seed and
<experiment>-s<S> with it; resumes from checkpoints/<run>.pt after an interruption.

Under ``torchrun --nproc_per_node=N stages/train.py <name>`` the meta-batch is split across
the N processes (`metalab.distributed`); only rank 0 logs to MLflow and writes files.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import pandas as pd

from metalab.cli import run_stage, stage_parser
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.device import configure, device_record, resolve_device
from metalab.distributed import distributed_session, environment_context, threads_per_process
from metalab.io import write_text
from metalab.layout import (
    CHECKPOINTS_DIR,
    DATA_METRICS_FILE,
    PREFETCHED_FILE,
    model_file,
    train_curve_file,
    train_metrics_file,
)
from metalab.params import Params, load_params
from metalab.records import DataMetrics, MetricsFileError, TrainSummary
from metalab.tracking import memory_figures, stage_run
from metalab.training import Trainer


def downloaded_archives() -> dict:
    """The download stage's record of each Omniglot archive (metrics/data.json: source,
    sha256, counts); none, with a warning, if it is missing or unreadable."""
    try:
        return DataMetrics.read(DATA_METRICS_FILE).to_dict()
    except MetricsFileError as error:
        print(f"warning: no dataset input on the MLflow run: {error}", file=sys.stderr)
        return {}


def main(args, params: Params) -> None:
    experiment_name = args.experiment
    # a namespace built by hand (tests, tools) may leave --seed out: the own run
    extra_seed = getattr(args, "seed", None)
    # name: the run (its files, checkpoint and model); params hold it as an experiment
    name, params = params.seeded(experiment_name, extra_seed)
    experiment = params.experiment(name)
    seed = params.train_config(name).seed
    logged = {
        "experiment": experiment.model_dump(exclude={"train"}),
        "train": params.train_config(name).model_dump(),
        "data": {"split": params.data.split.model_dump()},
    }
    tags = {
        "experiment": experiment_name,
        "seed": str(seed),
        "algorithm": experiment.algorithm,
        "stage_kind": "train",
    }
    stage = f"train@{name}" if extra_seed is None else f"train_seed@{name}"
    rank = environment_context()
    device = resolve_device(local_rank=rank.local_rank)
    configure(device, threads_per_process(params.train_config(name).threads, rank))
    with distributed_session(device=device) as distributed:
        arrays = load_prefetched(PREFETCHED_FILE)
        split = make_split(arrays.character_origin, params.data.split)
        logged["data"]["image_size"] = arrays.image_size
        tags["processes"] = distributed.world_size
        with stage_run(
            stage,
            logged,
            params.tracking,
            tags=tags,
            enabled=distributed.is_main,
            device=device,
            system_metrics=True,
        ) as run:
            if run.run_id is not None:  # lineage: the archives the prefetched data came from
                run.log_archives(downloaded_archives(), context="training")
            trainer = Trainer(
                name,
                params,
                arrays,
                split,
                CHECKPOINTS_DIR,
                progress=not args.no_progress,
                on_log=run.log_metrics,
                distributed=distributed,
                device=device,
            )
            result = trainer.run()
            if not distributed.is_main:
                return  # rank 0 holds the same weights and writes everything
            summary = TrainSummary(
                **{**result.summary, "experiment": experiment_name},
                seed=seed,
                **asdict(device_record(device)),
                **memory_figures(device),
                mlflow_run_id=run.run_id,
            )
            run.meter.add_tasks(summary.tasks, summary.training_seconds)
            figures = {
                "total_parameters": summary.total_parameters,
                "trainable_parameters": summary.trainable_parameters,
                "best_validation_accuracy": summary.best_validation_accuracy,
            }
            run.log_metrics(figures)
            trainer.save_model(model_file(name))
            if run.run_id is not None:  # the learner as an MLflow model on this run
                from metalab.mlflow_model import example_task, log_learner_model

                config = params.train_config(name)
                example = example_task(arrays, split.validation, config.n_way, config.k_shot)
                log_learner_model(run, model_file(name), example, metrics=figures)
            summary.write(train_metrics_file(name))
            history = pd.DataFrame(result.history).to_csv(index=False)
            write_text(train_curve_file(name), history)
    print(
        f"{name}: {summary.iterations} iterations, {summary.tasks_per_s:.1f} tasks/s, "
        f"best validation accuracy {summary.best_validation_accuracy:.3f} "
        f"(iteration {summary.best_iteration}), peak memory {summary.peak_memory_mb:.0f} MB "
        f"on {device}"
    )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("experiment", help="name of an entry under `experiments` in params.yaml")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed of an extra run (default: the experiment's own run, its train.seed)",
    )
    run_stage(main, parser, load_params)
