"""Stage `episodes`: the fixed meta-test episode sets every learner is evaluated on."""

from __future__ import annotations

from metalab.cli import run_stage, stage_parser
from metalab.data.config import DataParams, load_data_params
from metalab.data.episodes import write_evaluation_episodes
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.layout import EPISODES_DIR, EPISODES_METRICS_FILE, PREFETCHED_FILE
from metalab.records import EpisodesMetrics
from metalab.tracking import stage_run


def main(args, params: DataParams) -> None:
    logged = {
        "episodes": params.episodes.model_dump(),
        "data": {"split": params.data.split.model_dump()},
    }
    with stage_run("episodes", logged, params.tracking) as run:
        arrays = load_prefetched(PREFETCHED_FILE)
        split = make_split(arrays.character_origin, params.data.split)
        written = write_evaluation_episodes(
            EPISODES_DIR, split, arrays.drawings_per_character, params.episodes
        )
        run.meter.add_tasks(params.episodes.num_episodes * len(written))
        summary = {"protocol": split.protocol, "split": split.summary(), "episode_sets": written}
        EpisodesMetrics.model_validate(summary).write(EPISODES_METRICS_FILE)
        for setting, path in written.items():
            print(f"{setting}: {params.episodes.num_episodes} episodes -> {path}")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__), load_data_params)
