"""Stage `evaluate_rl@<name>-<seed>`: average return on held-out tasks before adaptation
and after each of `eval_adaptation_steps` policy-gradient steps, mean and 95% CI, for the
policy trained with `--seed` (models/rl/<name>-s<seed>.pt) and, on the same tasks, the
reference policies (random initialisation, oracle; `reference_<name>` keys of the same
file), into metrics/eval_rl/<name>-s<seed>.json. The held-out tasks and the evaluation's
random numbers come from `eval_seed`: the same for every training seed.

Computes on ``METALAB_DEVICE`` with the experiment's ``num_threads`` (the model file holds
CPU tensors; they are moved)."""

from __future__ import annotations

from dataclasses import asdict

from metalab.cli import StageError, run_stage, stage_parser
from metalab.device import configure, device_record, resolve_device
from metalab.layout import rl_eval_metrics_file, rl_model_file
from metalab.records import AdaptationReturn, RLEvaluationMetrics, adaptation_key
from metalab.rl.config import (
    RLParams,
    dvc_stage_key,
    load_rl_params,
    run_name,
    with_seed,
)
from metalab.rl.loop import evaluate_rl, load_agent, trained_adaptation_steps
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
    agent = load_agent(rl_model_file(name))
    tags = {
        "experiment": experiment,
        "seed": str(config.seed),
        "algorithm": config.algorithm,
        "stage_kind": "evaluate_rl",
    }
    logged = {"rl_experiment": config.model_dump()}
    with stage_run(
        f"evaluate_rl@{dvc_stage_key(experiment, args.seed)}",
        logged,
        params.tracking,
        tags=tags,
        device=device,
        system_metrics=True,
    ) as run:
        result = evaluate_rl(config, agent, device=device, threads=threads)
        run.meter.add_tasks(result["num_tasks"])
        run.log_metrics(result["metrics"])
        for reference, outcome in result["references"].items():
            run.log_metrics({f"{reference}_{k}": v for k, v in outcome["metrics"].items()})
        metrics = RLEvaluationMetrics(
            experiment=experiment,
            seed=config.seed,
            algorithm=config.algorithm,
            env=config.env,
            num_tasks=result["num_tasks"],
            trained_steps=trained_adaptation_steps(config),
            trajectories_per_task=config.eval_trajectories_per_task,
            eval_step_schedule=config.eval_step_schedule,
            returns=_returns(result["results"]),
            references={
                reference: _returns(outcome["results"])
                for reference, outcome in result["references"].items()
            },
            **asdict(device_record(device, threads)),
            **memory_figures(device),
        )
        metrics.write(rl_eval_metrics_file(name))
        for steps, value in metrics.returns.items():
            print(f"{name} {adaptation_key(steps)}: {value.mean_return:.2f} ± {value.ci95:.2f}")


def _returns(results: list[dict]) -> dict[int, AdaptationReturn]:
    """{adaptation steps: return} from `evaluate_rl`'s per-step results of one policy."""
    return {
        row["adaptation_steps"]: AdaptationReturn(
            mean_return=row["mean_return"], ci95=row["ci95"], std=row["std"]
        )
        for row in results
    }


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("experiment", help="name of an entry under `rl_experiments`")
    parser.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the experiment's)"
    )
    run_stage(main, parser, load_rl_params)
