"""Stage `train_rl@<name>-<seed>`: meta-train one named RL experiment
(`rl_experiments.<name>`) with one training seed (`--seed`, from dvc.yaml's seed matrix).

Writes models/rl/<run>.pt, metrics/train_rl/<run>.json (with its .info.json) and
plots/train_rl/<run>.csv, <run> = <name>-s<seed> (<name> without --seed); resumes from
checkpoints/rl/<run>.pt after an interruption.
Computes on ``METALAB_DEVICE`` (default: the GPU if there is one) with the experiment's
``num_threads``; model and checkpoint files hold CPU tensors whatever the device.
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from metalab.checkpoints import Checkpoint, fingerprint, source_digest
from metalab.cli import StageError, run_stage, stage_parser
from metalab.device import configure, device_record, resolve_device
from metalab.io import write_text
from metalab.layout import (
    rl_checkpoint_file,
    rl_model_file,
    rl_train_curve_file,
    rl_train_metrics_file,
)
from metalab.records import RLTrainSummary
from metalab.rl.config import (
    RLParams,
    dvc_stage_key,
    load_rl_params,
    run_name,
    with_seed,
)
from metalab.rl.learners import NonFiniteLossError
from metalab.rl.loop import save_agent, train_rl
from metalab.tracking import memory_figures, stage_run


def main(args, params: RLParams) -> None:
    experiment = args.experiment
    config = params.rl_experiment(experiment)
    try:
        config = with_seed(config, experiment, args.seed)
    except ValueError as error:
        raise StageError(str(error)) from None
    name = run_name(experiment, args.seed)
    device = resolve_device()
    threads = config.num_threads  # a param: the thread count may change the numbers
    configure(device, threads)
    # The config and the code fix an RL run (its tasks come from the config's seed).
    identity = {"config": config.model_dump(), "code": source_digest()}
    checkpoint = Checkpoint(rl_checkpoint_file(name), fingerprint(identity))
    state = checkpoint.load()
    if state is not None:
        print(f"resuming {name} from iteration {state['iteration']}")
    tags = {
        "experiment": experiment,
        "seed": str(config.seed),
        "algorithm": config.algorithm,
        "stage_kind": "train_rl",
    }
    logged = {"rl_experiment": config.model_dump()}
    with stage_run(
        f"train_rl@{dvc_stage_key(experiment, args.seed)}",
        logged,
        params.tracking,
        tags=tags,
        device=device,
        system_metrics=True,
    ) as run:

        def save_checkpoint(iteration: int, trainer_state: dict) -> None:
            checkpoint.save(trainer_state)

        try:
            agent, history = train_rl(
                config,
                on_iteration=lambda iteration, metrics: run.log_metrics(metrics, step=iteration),
                state=state,
                on_checkpoint=save_checkpoint,
                checkpoint_every=args.checkpoint_every,
                progress=not args.no_progress,
                device=device,
                threads=threads,
            )
        except NonFiniteLossError as error:
            raise StageError(f"RL experiment {experiment!r}, seed {config.seed}: {error}") from None
        seconds = sum(1.0 / row["tasks_per_second"] for row in history) * config.meta_batch_size
        tasks = len(history) * config.meta_batch_size
        run.meter.add_tasks(tasks, seconds)
        summary = RLTrainSummary(
            experiment=experiment,
            seed=config.seed,
            algorithm=config.algorithm,
            env=config.env,
            iterations=len(history),
            training_seconds=seconds,
            tasks_per_s=tasks / seconds,
            final_pre_adaptation_return=history[-1]["pre_adaptation_return"],
            final_post_adaptation_return=history[-1]["post_adaptation_return"],
            mlflow_run_id=run.run_id,
            **asdict(device_record(device, threads)),
            **memory_figures(device),
        )
        save_agent(rl_model_file(name), config, agent)
        summary.write(rl_train_metrics_file(name))
        frame = pd.DataFrame(history)
        frame.insert(0, "iteration", range(len(frame)))
        write_text(rl_train_curve_file(name), frame.to_csv(index=False))
        print(
            f"{name}: {len(history)} iterations in {seconds:.0f} s "
            f"({tasks / seconds:.1f} tasks/s); "
            f"last return {summary.final_pre_adaptation_return:.2f} before, "
            f"{summary.final_post_adaptation_return:.2f} after adaptation, on {device}"
        )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("experiment", help="name of an entry under `rl_experiments`")
    parser.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the experiment's)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=25, help="iterations")
    run_stage(main, parser, load_rl_params)
