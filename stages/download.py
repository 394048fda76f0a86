"""Stage `download`: fetch and verify the Omniglot archives into data/raw/."""

from __future__ import annotations

from metalab.cli import StageError, run_stage, stage_parser
from metalab.data.download import ArchiveError, DownloadError, ExpectedCounts, fetch_archives
from metalab.io import write_json
from metalab.layout import METRICS_DIR, RAW_DIR
from metalab.params import Params
from metalab.tracking import stage_run


def main(args, params: Params) -> None:
    data = params.data
    expected = {
        name: ExpectedCounts(**counts.model_dump()) for name, counts in data.expected.items()
    }
    with stage_run(
        "download",
        {"data": data.model_dump(include={"sources", "download_timeout", "expected"})},
        params.tracking.experiment_name,
        enabled=params.tracking.enabled,
    ) as run:
        try:
            summaries = fetch_archives(
                data.sources,
                RAW_DIR,
                expected,
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
        write_json(METRICS_DIR / "data.json", report)
        for name, row in report.items():
            run.log_metrics(
                {f"{name}.drawings": row["drawings"], f"{name}.mb": row["size_bytes"] / 2**20}
            )
            print(
                f"{name}: {row['drawings']} drawings, {row['characters']} characters, "
                f"{row['alphabets']} alphabets from {row['source']} (sha256 {row['sha256'][:12]}…)"
            )


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
