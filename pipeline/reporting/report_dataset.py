"""The report's "dataset" section (`evaluation:`): the typed results imagemill.evaluation.post_pass put
in `_job.json` (imagemill.core.evaluation_results), as the tables the page shows, each metric's as
its result draws it. Numbers are rounded there, for reading; report.json keeps them whole."""

from __future__ import annotations

from typing import Any

from imagemill.core.evaluation_results import EvaluationResults, Table


def dataset_results(evaluation: dict[str, Any] | None) -> EvaluationResults | None:
    """The job record's `evaluation` entry, typed; None for a job without evaluation."""
    return None if evaluation is None else EvaluationResults.model_validate(evaluation)


def dataset_tables(results: EvaluationResults | None) -> list[Table]:
    """The section's tables; none when the job has no evaluation."""
    return [] if results is None else results.report_tables()
