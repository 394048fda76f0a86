"""Stage `evaluate_rl@<name>`: average return on held-out tasks before adaptation and
after each of `eval_adaptation_steps` policy-gradient steps, mean and 95% CI."""

from __future__ import annotations

import torch

from metalab.cli import run_stage, stage_parser
from metalab.io import write_json
from metalab.layout import METRICS_DIR, MODELS_DIR
from metalab.params import Params
from metalab.rl.loop import evaluate_rl
from metalab.tracking import stage_run


def main(args, params: Params) -> None:
    name = args.experiment
    config = params.rl_experiment(name)
    saved = torch.load(MODELS_DIR / "rl" / f"{name}.pt", weights_only=False)
    with stage_run(
        f"evaluate_rl@{name}",
        {"rl_experiment": config.model_dump()},
        params.tracking.experiment_name,
        run_name=f"evaluate_rl {name}",
        tags={"experiment": name, "algorithm": config.algorithm, "stage_kind": "evaluate_rl"},
        enabled=params.tracking.enabled,
    ) as run:
        result = evaluate_rl(config, saved["agent"])
        run.meter.add_tasks(result["num_tasks"])
        run.log_metrics(result["metrics"])
        rows = {
            (
                "before_adaptation"
                if row["adaptation_steps"] == 0
                else f"after_{row['adaptation_steps']}_steps"
            ): {
                "mean_return": row["mean_return"],
                "ci95": row["ci95"],
                "std": row["std"],
            }
            for row in result["results"]
        }
        write_json(
            METRICS_DIR / "eval_rl" / f"{name}.json",
            {
                "experiment": name,
                "algorithm": config.algorithm,
                "env": config.env,
                "num_tasks": result["num_tasks"],
                **rows,
            },
        )
        for key, row in rows.items():
            print(f"{name} {key}: {row['mean_return']:.2f} ± {row['ci95']:.2f}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("experiment", help="name of an entry under `rl_experiments`")
    run_stage(main, parser)
