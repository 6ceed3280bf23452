"""The HTML report of a run folder: `write_report(run_dir)` -> run_dir/report.html. Reads the run folder only."""

from rlhf.report.html import write_report

__all__ = ["write_report"]
