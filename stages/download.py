"""Stage `download`: fetch and verify the Omniglot archives into data/raw/."""

from __future__ import annotations

from metalab.cli import StageError, run_stage, stage_parser
from metalab.data.archives import ArchiveError
from metalab.data.config import DataParams, load_data_params
from metalab.data.download import DownloadError, fetch_archives
from metalab.layout import DATA_METRICS_FILE, RAW_DIR
from metalab.records import DataMetrics
from metalab.tracking import stage_run


def main(args, params: DataParams) -> None:
    data = params.data
    logged = {
        "data": {
            "sources": data.sources,
            "download_timeout": data.download_timeout,
            "expected": {name: counts.model_dump() for name, counts in data.expected.items()},
        }
    }
    with stage_run("download", logged, params.tracking) as run:
        try:
            summaries = fetch_archives(
                data.sources,
                RAW_DIR,
                data.expected,
                timeout=data.download_timeout,
                progress=not args.no_progress,
            )
        except (DownloadError, ArchiveError) as error:
            raise StageError(str(error)) from None
        report = {
            name: {
                "source": summary.source,
                "sha256": summary.sha256,
                "size_bytes": summary.size_bytes,
                "alphabets": summary.alphabets,
                "characters": summary.characters,
                "drawings": summary.drawings,
            }
            for name, summary in summaries.items()
        }
        DataMetrics.model_validate(report).write(DATA_METRICS_FILE)
        run.log_archives(report, context="download")  # MLflow datasets, by their sha256
        for name, row in report.items():
            run.log_metrics(
                {f"{name}.drawings": row["drawings"], f"{name}.mb": row["size_bytes"] / 2**20}
            )
            print(
                f"{name}: {row['drawings']} drawings, {row['characters']} characters, "
                f"{row['alphabets']} alphabets from {row['source']} (sha256 {row['sha256'][:12]}…)"
            )


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__), load_data_params)
