"""Experiment tracking: MLflow parent/child runs of a sweep and the fold result tables."""

from softteacher.track.mlflow_runs import (
    RunRef,
    find_or_start_child_run,
    finish_run,
    log_file_artifact,
    log_final_metrics,
    log_json_artifact,
    log_metrics,
    log_params,
    resume_parent_run,
    run_status,
    sanitize_key,
    set_tags,
    start_parent_run,
)
from softteacher.track.provenance import git_commit
from softteacher.track.stores import TrackingError, default_tracking_uri
from softteacher.track.tables import (
    DuplicateFoldError,
    FoldSummary,
    TrialResult,
    format_markdown,
    format_table,
    log_tables_to_run,
    summarize,
    table_metrics,
    write_tables,
)

__all__ = [
    "DuplicateFoldError",
    "FoldSummary",
    "RunRef",
    "TrackingError",
    "TrialResult",
    "default_tracking_uri",
    "find_or_start_child_run",
    "finish_run",
    "format_markdown",
    "format_table",
    "git_commit",
    "log_file_artifact",
    "log_final_metrics",
    "log_json_artifact",
    "log_metrics",
    "log_params",
    "log_tables_to_run",
    "resume_parent_run",
    "run_status",
    "sanitize_key",
    "set_tags",
    "start_parent_run",
    "summarize",
    "table_metrics",
    "write_tables",
]
