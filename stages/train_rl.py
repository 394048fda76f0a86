"""Stage `train_rl@<name>`: meta-train one named RL experiment (`rl_experiments.<name>`).

Writes models/rl/<name>.pt, metrics/train_rl/<name>.json and plots/train_rl/<name>.csv;
resumes from checkpoints/rl/<name>.pt after an interruption.
"""

from __future__ import annotations

import pandas as pd
import torch

from metalab.cli import StageError, run_stage, stage_parser
from metalab.io import save_torch, write_json, write_text
from metalab.layout import CHECKPOINTS_DIR, METRICS_DIR, MODELS_DIR, PLOTS_DIR
from metalab.params import Params
from metalab.rl.learners import NonFiniteLossError
from metalab.rl.loop import train_rl
from metalab.tracking import peak_memory_mb, stage_run
from metalab.training import config_fingerprint


def main(args, params: Params) -> None:
    name = args.experiment
    config = params.rl_experiment(name)
    checkpoint = CHECKPOINTS_DIR / "rl" / f"{name}.pt"
    fingerprint = config_fingerprint(config.model_dump())
    state = None
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            state = saved["state"]
            print(f"resuming {name} from iteration {saved['iteration']}")
    with stage_run(
        f"train_rl@{name}",
        {"rl_experiment": config.model_dump()},
        params.tracking.experiment_name,
        run_name=f"train_rl {name}",
        tags={"experiment": name, "algorithm": config.algorithm, "stage_kind": "train_rl"},
        enabled=params.tracking.enabled,
    ) as run:

        def save_checkpoint(iteration: int, trainer_state: dict) -> None:
            save_torch(
                checkpoint,
                {"fingerprint": fingerprint, "iteration": iteration, "state": trainer_state},
            )

        try:
            agent, history = train_rl(
                config,
                on_iteration=lambda iteration, metrics: run.log_metrics(metrics, step=iteration),
                state=state,
                on_checkpoint=save_checkpoint,
                checkpoint_every=args.checkpoint_every,
                progress=not args.no_progress,
            )
        except NonFiniteLossError as error:
            raise StageError(f"RL experiment {name!r}: {error}") from None
        seconds = sum(1.0 / row["tasks_per_second"] for row in history) * config.meta_batch_size
        tasks = len(history) * config.meta_batch_size
        run.meter.add_tasks(tasks, seconds)
        summary = {
            "experiment": name,
            "algorithm": config.algorithm,
            "env": config.env,
            "iterations": len(history),
            "training_seconds": seconds,
            "tasks_per_s": tasks / seconds,
            "final_pre_adaptation_return": history[-1]["pre_adaptation_return"],
            "final_post_adaptation_return": history[-1]["post_adaptation_return"],
            "peak_memory_mb": peak_memory_mb(),
            "mlflow_run_id": run.run_id,
        }
        model_file = MODELS_DIR / "rl" / f"{name}.pt"
        save_torch(model_file, {"config": config.model_dump(), "agent": agent})
        write_json(METRICS_DIR / "train_rl" / f"{name}.json", summary)
        frame = pd.DataFrame(history)
        frame.insert(0, "iteration", range(len(frame)))
        write_text(PLOTS_DIR / "train_rl" / f"{name}.csv", frame.to_csv(index=False))
        print(
            f"{name}: {len(history)} iterations in {seconds:.0f} s "
            f"({tasks / seconds:.1f} tasks/s); "
            f"last return {summary['final_pre_adaptation_return']:.2f} before, "
            f"{summary['final_post_adaptation_return']:.2f} after adaptation"
        )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("experiment", help="name of an entry under `rl_experiments`")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="iterations")
    run_stage(main, parser)
