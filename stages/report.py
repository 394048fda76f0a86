"""Stage `report`: compare every experiment's training and held-out evaluation.

Writes reports/comparison.md and .csv (one row per experiment), reports/pairs.csv
(paired per-episode comparisons of `report.pairs`), reports/accuracy.csv (data for
`dvc plots`) and plots/{training_loss,accuracy,pareto,speed_memory}.png, and logs them to
MLflow. With --update-readme, also rewrites the README's results block.
"""

from __future__ import annotations

from pathlib import Path

from metalab.cli import run_stage, stage_parser
from metalab.layout import METRICS_DIR, PLOTS_DIR, REPORTS_DIR
from metalab.params import Params, load_params
from metalab.report import build_report, render_readme_table, update_readme
from metalab.tracking import stage_run


def main(args, params: Params) -> None:
    settings = params.evaluation_settings()
    logged = {"report": params.report.model_dump(), "settings": ",".join(settings)}
    with stage_run("report", logged, params.tracking, tags={"stage_kind": "report"}) as run:
        files = build_report(
            METRICS_DIR,
            PLOTS_DIR,
            REPORTS_DIR,
            sort_by=params.report.sort_by,
            pairs=params.report.pairs,
            experiments={name: e.algorithm for name, e in params.experiments.items()},
            settings=settings,
        )
        for path in files.all:
            run.log_artifact(path, artifact_path="report")
        print(f"wrote {files.markdown} ({len(files.table)} experiments)")
        for note in files.notes:
            print(f"note: {note}")
        if args.update_readme:
            block = render_readme_table(files.table)
            changed = update_readme(Path(args.update_readme), block)
            print(f"{args.update_readme}: results block {'updated' if changed else 'unchanged'}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument(
        "--update-readme",
        metavar="README",
        help="also rewrite the results block of this README (not part of `dvc repro`)",
    )
    run_stage(main, parser, load_params)
