"""Stage `prefetch`: decode every Omniglot PNG once into data/prefetched/omniglot.npz."""

from __future__ import annotations

from metalab.cli import run_stage, stage_parser
from metalab.data.archives import ARCHIVE_NAMES
from metalab.data.config import DataParams, load_data_params
from metalab.data.prefetch import prefetch_omniglot
from metalab.layout import PREFETCH_METRICS_FILE, PREFETCHED_FILE, RAW_DIR
from metalab.records import PrefetchMetrics
from metalab.tracking import stage_run


def main(args, params: DataParams) -> None:
    data = params.data
    logged = {"data": {"image_size": data.image_size, "prefetch_workers": data.prefetch_workers}}
    with stage_run("prefetch", logged, params.tracking) as run:
        summary = prefetch_omniglot(
            {name: RAW_DIR / f"{name}.zip" for name in ARCHIVE_NAMES},
            data.image_size,
            PREFETCHED_FILE,
            workers=data.prefetch_workers,
            progress=not args.no_progress,
        )
        run.meter.add_tasks(summary.images)  # 'tasks' of this stage: decoded images
        figures = {
            "images": summary.images,
            "characters": summary.characters,
            "alphabets": summary.alphabets,
            "image_size": summary.image_size,
            "seconds": round(summary.seconds, 2),
        }
        run.log_metrics({"images": summary.images, "prefetch_seconds": summary.seconds})
        PrefetchMetrics.model_validate(figures).write(PREFETCH_METRICS_FILE)
        print(
            f"prefetched {summary.images} images ({summary.characters} characters) at "
            f"{summary.image_size}x{summary.image_size} in {summary.seconds:.1f} s "
            f"-> {PREFETCHED_FILE}"
        )


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__), load_data_params)
