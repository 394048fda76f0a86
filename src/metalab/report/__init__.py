"""The comparison report of all experiments: tables, paired comparisons, plots, README.

`build_report` is what the `report` stage runs; `render_readme_table` and `update_readme`
refresh the README's results block from reports/comparison.csv.
"""

from metalab.report.build import ReportFiles, build_report
from metalab.report.readme import render_readme_table, update_readme

__all__ = ["ReportFiles", "build_report", "render_readme_table", "update_readme"]
