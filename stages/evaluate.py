"""Stage `evaluate@<experiment>`: held-out accuracy of one trained model; with ``--seed S``
(stage `evaluate_seed@<experiment>-s<S>`) the model of that extra training seed. Every run
is scored on the same tasks. Below, <name> is the run: <experiment> or <experiment>-s<S>.

Loads models/<name>.pt through the public learner API (`metalab.load_learner`) and scores
it on the fixed meta-test episode sets data/episodes/<setting>.npz, before and after
adaptation. Writes metrics/eval/<name>.json (scalars per setting, 95% intervals; the names,
episode-set fingerprints and run ids beside it in <name>.info.json) and
metrics/eval/<name>.episodes.csv (per-episode accuracies, for paired comparisons).

With ``evaluate.step_selection``, a gradient learner's test-time steps on each setting other
than its training one are chosen first, on validation tasks of that setting drawn from the
split's validation classes (``data.split``), shaped as the stored test tasks;
the choice and every candidate's validation accuracy go into the setting's result. With
``evaluate.trained_setting_only``, a model is evaluated only on the settings of the N-way
K-shot tasks it was trained on (one model per setting).
"""

from __future__ import annotations

from dataclasses import asdict

from metalab import load_learner
from metalab.cli import run_stage, stage_parser
from metalab.data.config import parse_setting
from metalab.data.episodes import EpisodeIndex
from metalab.data.prefetch import OmniglotArrays, load_prefetched
from metalab.data.splits import make_split
from metalab.device import configure, device_record, resolve_device
from metalab.evaluation import (
    StepSelection,
    evaluate_learner,
    load_episode_sets,
    numeric_metrics,
    train_run_id,
    validation_episode_sets,
)
from metalab.io import write_text
from metalab.layout import (
    EPISODES_DIR,
    PREFETCHED_FILE,
    eval_episodes_file,
    eval_metrics_file,
    model_file,
    train_metrics_file,
)
from metalab.params import Params, load_params, run_name
from metalab.tracking import memory_figures, stage_run


def step_selection(
    params: Params, arrays: OmniglotArrays, episode_sets: dict[str, EpisodeIndex]
) -> StepSelection | None:
    """``evaluate.step_selection`` with its validation tasks (None when off): per setting,
    tasks from the validation classes of ``data.split``, shaped as the stored test tasks
    `episode_sets` (so the query count comes from the episode files, not from params)."""
    config = params.evaluate.step_selection
    if config is None:
        return None
    split = make_split(arrays.character_origin, params.data.split)
    sets = validation_episode_sets(
        split.validation, arrays.drawings_per_character, episode_sets, config.episodes, config.seed
    )
    return StepSelection(sets, tuple(config.steps), config.seed)


def main(args, params: Params) -> None:
    experiment_name = args.experiment
    # a namespace built by hand (tests, tools) may leave --seed out: the own run
    seed = getattr(args, "seed", None)
    experiment = params.experiment(experiment_name)
    name = run_name(experiment_name, seed)
    settings = params.evaluation_settings()
    device = resolve_device()
    # train.threads: the thread count changes some learners' numbers (tests/test_threads.py)
    configure(device, params.train_config(experiment_name).threads)
    learner = load_learner(model_file(name), device=device)
    if params.evaluate.trained_setting_only:  # the model file says what it was trained on
        settings = [s for s in settings if parse_setting(s) == (learner.n_way, learner.k_shot)]
    arrays = load_prefetched(PREFETCHED_FILE)
    episode_sets = load_episode_sets(settings, EPISODES_DIR, params.evaluate.max_episodes)
    selection = step_selection(params, arrays, episode_sets)
    parent_run = train_run_id(train_metrics_file(name))
    tags = {
        "experiment": experiment_name,
        "algorithm": experiment.algorithm,
        "stage_kind": "evaluate",
    }
    if seed is not None:  # the own run's seed is in its train summary
        tags["seed"] = str(seed)
    if parent_run:
        # The UI nests this run under its training run; the tag also makes it searchable.
        tags.update({"train_run_id": parent_run, "mlflow.parentRunId": parent_run})
    logged = {
        "evaluate": params.evaluate.model_dump(),
        "settings": ",".join(settings),
        "episodes": {"settings": params.episodes.settings, "seed": params.episodes.seed},
        "model": {"algorithm": learner.algorithm, "n_way": learner.n_way},
    }
    stage = f"evaluate@{name}" if seed is None else f"evaluate_seed@{name}"
    with stage_run(
        stage, logged, params.tracking, tags=tags, device=device, system_metrics=True
    ) as run:
        evaluation = evaluate_learner(
            learner,
            arrays.images,
            episode_sets,
            steps=params.evaluate.adaptation_steps,
            seed=params.episodes.seed,
            progress=not args.no_progress,
            experiment=experiment_name,
            step_selection=selection,
        )
        metrics = evaluation.record(
            seed=seed,
            train_run_id=parent_run,
            mlflow_run_id=run.run_id,
            **asdict(device_record(device)),
            **memory_figures(device),
        )
        run.meter.add_tasks(metrics.episodes, metrics.evaluation_seconds)
        run.log_metrics(numeric_metrics(metrics))
        episodes_file = eval_episodes_file(name)
        write_text(episodes_file, evaluation.episode_table().to_csv(index=False))
        metrics.write(eval_metrics_file(name))
        run.log_artifact(episodes_file)
        for setting, summary in metrics.settings.items():
            before, ci95 = summary.accuracy_before, summary.ci95
            ci_text = f" +- {ci95:.4f}" if ci95 is not None else ""
            before_text = f", before adaptation {before:.4f}" if before is not None else ""
            print(
                f"{name} {setting}: accuracy {summary.accuracy:.4f}{ci_text}{before_text} "
                f"({summary.episodes} episodes)"
            )
            if summary.step_selection_note is not None:
                print(f"{name} {setting}: {summary.step_selection_note}")
        for setting, reason in metrics.unsupported.items():
            print(f"{name} {setting}: not evaluated: {reason}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("experiment", help="name of an entry under `experiments` in params.yaml")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed of an extra run (models/<experiment>-s<seed>.pt; default: the "
        "experiment's own run)",
    )
    run_stage(main, parser, load_params)
