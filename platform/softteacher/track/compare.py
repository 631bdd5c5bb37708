"""Compare finished runs straight from MLflow: any experiment, grouped by any params.

The sweep's own table (``track.tables``) only knows the grid it ran; this reads what the
store holds, so fold sweeps, ablations and runs of different days can be set side by side.
Values come from ``mlflow.search_runs``: params are strings there, metrics their latest value.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from softteacher.config import METHODS
from softteacher.names import FINAL_PREFIX, STUDENT_AP, TEACHER_AP
from softteacher.track.mlflow_runs import PARENT_TAG
from softteacher.track.render import plain_table

DEFAULT_METRICS = (FINAL_PREFIX + TEACHER_AP, FINAL_PREFIX + STUDENT_AP)
PARAM_PREFIX = "params."
METRIC_PREFIX = "metrics."
PARENT_COLUMN = f"tags.{PARENT_TAG}"
RUN_NAME_COLUMN = "tags.mlflow.runName"
RUNS_COLUMN = "runs"
_RUN_ID = re.compile(r"[A-Za-z0-9_-]+")
_MISSING = "-"


class CompareError(ValueError):
    """The comparison cannot be made as asked; the message says what to pass instead."""


class UnknownExperimentError(CompareError):
    """An experiment name the store does not have (or has deleted)."""


class MissingStoreError(CompareError):
    """The tracking URI names a local sqlite file that does not exist."""


class NoRunsError(CompareError):
    """The experiments (or the parent run) hold no runs to compare."""


class UnknownFieldError(CompareError):
    """A ``--by`` param or ``--metrics`` metric that no loaded run has."""


def mean_column(metric: str) -> str:
    return f"{metric} mean"


def std_column(metric: str) -> str:
    return f"{metric} std"


ENDED_UNFINISHED = ("FAILED", "KILLED")


def count_column(metric: str) -> str:
    """How many runs of the group have a finite value of ``metric``."""
    return f"{metric} n"


def load_runs(
    tracking_uri: str, experiments: Sequence[str], *, parent_run_id: str | None = None
) -> pd.DataFrame:
    """The runs of ``experiments`` as ``mlflow.search_runs`` returns them (one row a run).

    Only child runs (the trials) when there are any: a sweep's parent run holds the tables,
    not a trial's result, and would count as one more "fold". ``parent_run_id`` keeps the
    children of that one sweep. FAILED and KILLED runs never count: their metrics are a
    trial's last words, not its result.
    """
    if not experiments:
        raise CompareError("no experiment given; pass --experiment NAME[,NAME...]")
    check_experiments(tracking_uri, experiments)
    filter_string = ""
    if parent_run_id is not None:
        if not _RUN_ID.fullmatch(parent_run_id):
            raise CompareError(f"--parent {parent_run_id!r} is not an MLflow run id (hex digits)")
        filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    with _tracking_uri(tracking_uri):
        runs = mlflow.search_runs(experiment_names=list(experiments), filter_string=filter_string)
    if "status" in runs.columns:
        runs = runs[~runs["status"].isin(ENDED_UNFINISHED)]
    if parent_run_id is None and PARENT_COLUMN in runs.columns:
        children = runs[runs[PARENT_COLUMN].notna()]
        if not children.empty:
            runs = children
    if runs.empty:
        where = f"under parent run {parent_run_id} " if parent_run_id else ""
        raise NoRunsError(
            f"no runs {where}in MLflow experiment(s) {', '.join(experiments)} at {tracking_uri}; "
            "run a sweep first or check --experiment/--parent/--tracking-uri"
        )
    return runs.reset_index(drop=True)


def check_experiments(tracking_uri: str, experiments: Sequence[str]) -> None:
    """Fail on the first name the store lacks, listing the ones it has (``search_runs`` would
    only log a warning and compare nothing)."""
    _check_store_exists(tracking_uri)
    client = MlflowClient(tracking_uri)
    for name in experiments:
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "active":
            continue
        existing = sorted((e.name for e in client.search_experiments()), key=str.lower)
        state = "is deleted" if found is not None else "does not exist"
        raise UnknownExperimentError(
            f"MLflow experiment {name!r} {state} in {tracking_uri}; existing experiments: "
            f"{', '.join(existing) or 'none'} (pass one with --experiment)"
        )


def newest_parent_run(tracking_uri: str, experiment: str) -> str:
    """The run id of the newest sweep (a run without a parent) in ``experiment``.

    Children start after their parent, so the newest runs are usually children: the search
    pages on until the first run without the parent tag.
    """
    check_experiments(tracking_uri, [experiment])
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], order_by=["attributes.start_time DESC"], page_token=token
        )
        for run in page:
            if PARENT_TAG not in run.data.tags:
                return run.info.run_id
        token = page.token
        if not token:
            raise NoRunsError(
                f"MLflow experiment {experiment!r} at {tracking_uri} has no parent (sweep) run; "
                "pass --parent RUN_ID"
            )


def curve_table(tracking_uri: str, run_ids: Sequence[str], metrics: Sequence[str]) -> str:
    """Markdown: the metrics of each run at every step where its first metric was logged
    (``teacher/AP``: the evaluation steps), one row a run and step. It shows whether a run
    had plateaued, which a final figure cannot."""
    if not metrics:
        raise CompareError("curve_table needs at least one metric")
    client = MlflowClient(tracking_uri)
    lines = [
        "| run | step | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for run_id in run_ids:
        name = client.get_run(run_id).info.run_name
        history = {
            metric: {m.step: m.value for m in client.get_metric_history(run_id, metric)}
            for metric in metrics
        }
        for step in sorted(history[metrics[0]]):
            cells = [
                f"{history[m][step]:.{3 if abs(history[m][step]) < 1.5 else 1}f}"
                if step in history[m]
                else _MISSING
                for m in metrics
            ]
            lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def child_run_ids(runs: pd.DataFrame, parent_run_id: str) -> list[str]:
    """The loaded children of one sweep, in run-name order (stable across calls)."""
    if PARENT_COLUMN not in runs.columns:
        return []
    children = runs[runs[PARENT_COLUMN] == parent_run_id]
    if RUN_NAME_COLUMN in children.columns:
        children = children.sort_values(RUN_NAME_COLUMN, kind="stable")
    return list(children["run_id"])


def group_summary(
    runs: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS
) -> pd.DataFrame:
    """Mean, sample std (ddof=1; 0.0 for a single run) and count of each metric per group.

    ``by`` names params, bare (``method``, ``method.cls_thr``) or as search_runs columns
    (``params.method``). Param values that are all numbers become floats, so ratios sort
    as 1 < 5 < 10; methods sort in the ablation order of ``config.METHODS``. Missing and
    non-finite metric values are left out of the mean and std (``<metric> n`` says how many
    remain). Columns: the ``by`` names, ``runs``, then per metric ``<m> mean``, ``<m> std``,
    ``<m> n``.
    """
    if not by:
        raise CompareError("group by at least one param, e.g. --by method,ratio")
    names = [_bare(name, PARAM_PREFIX) for name in by]
    metric_names = [_bare(name, METRIC_PREFIX) for name in metrics]
    keys = pd.DataFrame(
        {name: _typed(runs[_param_column(runs, name)]) for name in names}, index=runs.index
    )
    values = {m: runs[_metric_column(runs, m)].astype(float) for m in metric_names}
    groups: dict[tuple, list] = {}
    for index, key in zip(runs.index, keys.itertuples(index=False, name=None), strict=True):
        groups.setdefault(key, []).append(index)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(_sort_key(n, v) for n, v in zip(names, k))):
        row: dict[str, object] = dict(zip(names, key, strict=True))
        row[RUNS_COLUMN] = len(groups[key])
        for metric in metric_names:
            present = [v for v in values[metric].loc[groups[key]] if math.isfinite(v)]
            row[mean_column(metric)] = statistics.fmean(present) if present else math.nan
            row[std_column(metric)] = (
                statistics.stdev(present) if len(present) > 1 else 0.0 if present else math.nan
            )
            row[count_column(metric)] = len(present)
        rows.append(row)
    columns = [*names, RUNS_COLUMN]
    for metric in metric_names:
        columns += [mean_column(metric), std_column(metric), count_column(metric)]
    return pd.DataFrame(rows, columns=columns)


def summary_metrics(summary: pd.DataFrame) -> list[str]:
    """The metric names of a ``group_summary`` table, in its column order."""
    suffix = " mean"
    return [c[: -len(suffix)] for c in summary.columns if c.endswith(suffix)]


def summary_keys(summary: pd.DataFrame) -> list[str]:
    """The ``by`` names of a ``group_summary`` table (the columns before ``runs``)."""
    columns = list(summary.columns)
    return columns[: columns.index(RUNS_COLUMN)]


def format_summary(summary: pd.DataFrame) -> str:
    """Aligned plain text with ``mean +- std`` cells; ``(n=k)`` when only k of the group's
    runs have the metric, ``-`` when none has."""
    keys, metrics = summary_keys(summary), summary_metrics(summary)
    header = [*keys, RUNS_COLUMN, *metrics]
    rows = []
    for _, row in summary.iterrows():
        cells = [_key_text(row[k]) for k in keys] + [str(int(row[RUNS_COLUMN]))]
        for metric in metrics:
            count = int(row[count_column(metric)])
            if count == 0:
                cells.append(_MISSING)
                continue
            cell = f"{row[mean_column(metric)]:.2f} +- {row[std_column(metric)]:.2f}"
            if count != row[RUNS_COLUMN]:
                cell += f" (n={count})"
            cells.append(cell)
        rows.append(cells)
    return plain_table(header, rows)


def _check_store_exists(tracking_uri: str) -> None:
    """Opening a sqlite URI creates the database: a mistyped path would look like an empty
    store, and a read-only comparison would leave a stray ``mlflow.db`` behind."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return
    db_file = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
    if not db_file.is_file():
        raise MissingStoreError(
            f"no MLflow store at {db_file}; run a sweep first or pass --tracking-uri"
        )


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """``mlflow.search_runs`` reads the global tracking URI; set it only for the call."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _bare(name: str, prefix: str) -> str:
    name = name.strip()
    return name[len(prefix) :] if name.startswith(prefix) else name


def _param_column(runs: pd.DataFrame, name: str) -> str:
    column = PARAM_PREFIX + name
    if column in runs.columns and runs[column].notna().any():
        return column
    params = sorted(c[len(PARAM_PREFIX) :] for c in runs.columns if c.startswith(PARAM_PREFIX))
    top = [p for p in params if "." not in p]
    sections = len(params) - len(top)
    config_hint = (
        f" or one of {sections} config params such as {_first_dotted(params)}" if sections else ""
    )
    raise UnknownFieldError(
        f"no loaded run has param {name!r}; group by one of: {', '.join(top)}{config_hint}"
    )


def _metric_column(runs: pd.DataFrame, name: str) -> str:
    column = METRIC_PREFIX + name
    if column in runs.columns and runs[column].notna().any():
        return column
    available = sorted(c[len(METRIC_PREFIX) :] for c in runs.columns if c.startswith(METRIC_PREFIX))
    finals = [m for m in available if m.startswith(FINAL_PREFIX)] or available[:12]
    raise UnknownFieldError(
        f"no loaded run has metric {name!r} (unfinished runs have no final/ metrics); "
        f"pass --metrics from: {', '.join(finals) or 'none logged'}"
    )


def _first_dotted(params: Sequence[str]) -> str:
    return next(p for p in params if "." in p)


def _typed(column: pd.Series) -> pd.Series:
    """Floats when every logged value is a number (``"10.0"`` -> 10.0), else the strings;
    a run without the param gets None."""
    present = [v for v in column if _is_present(v)]
    try:
        for value in present:
            float(value)
        convert = float
    except (TypeError, ValueError):
        convert = str
    typed = [convert(v) if _is_present(v) else None for v in column]
    return pd.Series(typed, index=column.index, dtype=object)


def _is_present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _sort_key(name: str, value: object) -> tuple:
    """Known methods in ablation order, then numbers, then text, then missing values."""
    if value is None:
        return (3, "")
    if name == "method" and value in METHODS:
        return (0, METHODS.index(value))
    if isinstance(value, float):
        return (1, value)
    return (2, str(value))


def _key_text(value: object) -> str:
    """A group key as printed; a missing param (None, or NaN once pandas made the column
    numeric) prints as ``-``."""
    if not _is_present(value):
        return _MISSING
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
