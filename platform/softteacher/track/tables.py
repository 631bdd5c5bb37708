"""The end-of-sweep table: each setting's mean and sample std over its folds (STAC protocol).

A setting is (labeled ratio, method, foreground threshold, variance threshold); its folds
are the repeated labeled draws the paper averages over. With several seeds a fold, the mean
and std run over every (fold, seed) run, and ``seed_stds`` is the std over seeds alone
(within a fold, averaged over folds): the run-to-run noise a difference must exceed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from softteacher.config import METHODS
from softteacher.files import write_atomically
from softteacher.names import STUDENT_AP, TEACHER_AP
from softteacher.track.mlflow_runs import (
    RunRef,
    log_file_artifact,
    log_metrics,
    sanitize_key,
)
from softteacher.track.render import markdown_table, plain_table

DEFAULT_METRICS = (TEACHER_AP, STUDENT_AP)
_KEY_COLUMNS = ("ratio %", "method", "cls_thr", "reg_thr", "folds")


class DuplicateFoldError(ValueError):
    """Two results for the same fold of one setting: one of them would count twice."""


@dataclass(frozen=True)
class TrialResult:
    """One trial's final metrics; ``ratio`` is the labeled percentage (1.0 means 1%)."""

    ratio: float
    fold: int
    method: str
    cls_thr: float
    reg_thr: float
    metrics: dict[str, float]
    seed: int | None = None  # None: the preset's
    # an early-stopping scheduler ended it at this step: listed, never averaged in
    stopped_at: int | None = None


@dataclass(frozen=True)
class FoldSummary:
    """One setting over its folds; ``per_fold[metric]`` lines up with ``folds`` (None: the
    fold has no finite value, e.g. an AP pycocotools leaves undefined)."""

    ratio: float
    method: str
    cls_thr: float
    reg_thr: float
    n_folds: int
    folds: tuple[int, ...]
    means: dict[str, float]
    stds: dict[str, float]
    per_fold: dict[str, tuple[float | None, ...]]
    n_runs: int = 0
    seed_stds: dict[str, float] = field(default_factory=dict)
    n_stopped: int = 0  # trials of this setting stopped early (left out of the means)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.per_fold)


def summarize(
    results: Sequence[TrialResult], metrics: Sequence[str] = DEFAULT_METRICS
) -> list[FoldSummary]:
    """Group by setting and reduce each metric over folds; sorted by ratio, then method in
    the ablation order of ``config.METHODS``, then thresholds.

    The std is the sample std (ddof=1), 0.0 for a single fold. Missing or non-finite values
    are left out of the mean and std; a metric no fold has gets no mean and no std.
    """
    groups: dict[tuple[float, str, float, float], dict[tuple, TrialResult]] = {}
    stopped: dict[tuple[float, str, float, float], int] = {}
    for result in results:
        key = (result.ratio, result.method, result.cls_thr, result.reg_thr)
        runs = groups.setdefault(key, {})
        if result.stopped_at is not None:
            stopped[key] = stopped.get(key, 0) + 1
            continue
        replicate = (result.fold, result.seed)
        if replicate in runs:
            seed = "" if result.seed is None else f" seed {result.seed}"
            raise DuplicateFoldError(
                f"fold {result.fold}{seed} of setting ratio={result.ratio}% "
                f"method={result.method} cls_thr={result.cls_thr} reg_thr={result.reg_thr} "
                "appears twice; pass one result per trial (e.g. only FINISHED child runs)"
            )
        runs[replicate] = result

    summaries = []
    for (ratio, method, cls_thr, reg_thr), runs in sorted(groups.items(), key=_setting_order):
        folds = tuple(sorted({fold for fold, _ in runs}))
        means, stds, per_fold, seed_stds = {}, {}, {}, {}
        for metric in metrics:
            by_fold: dict[int, list[float]] = {fold: [] for fold in folds}
            for (fold, _), result in runs.items():
                value = _finite_or_none(result.metrics.get(metric))
                if value is not None:
                    by_fold[fold].append(value)
            per_fold[metric] = tuple(
                statistics.fmean(by_fold[f]) if by_fold[f] else None for f in folds
            )
            present = [v for values in by_fold.values() for v in values]
            if present:
                means[metric] = statistics.fmean(present)
                stds[metric] = statistics.stdev(present) if len(present) > 1 else 0.0
            within = [statistics.stdev(v) for v in by_fold.values() if len(v) > 1]
            if within:
                seed_stds[metric] = statistics.fmean(within)
        summaries.append(
            FoldSummary(
                ratio,
                method,
                cls_thr,
                reg_thr,
                len(folds),
                folds,
                means,
                stds,
                per_fold,
                n_runs=len(runs),
                seed_stds=seed_stds,
                n_stopped=stopped.get((ratio, method, cls_thr, reg_thr), 0),
            )
        )
    return summaries


def format_table(summaries: Sequence[FoldSummary]) -> str:
    """Aligned plain text, one row per setting, ``mean +- std`` cells."""
    stopped = _any_stopped(summaries)
    return plain_table(_header(summaries), [_row_cells(s, stopped) for s in summaries])


def format_markdown(summaries: Sequence[FoldSummary]) -> str:
    """The same table as GitHub Markdown, for the sweep's README or MLflow's artifact view."""
    stopped = _any_stopped(summaries)
    return markdown_table(_header(summaries), [_row_cells(s, stopped) for s in summaries])


def write_tables(
    summaries: Sequence[FoldSummary], results_dir: Path, stem: str = "fold_table"
) -> dict[str, Path]:
    """Write ``<stem>.csv`` (numeric ``*_mean``/``*_std`` columns), ``<stem>.json`` (with
    per-fold values) and ``<stem>.md``; each replaces its old copy atomically, so a reader
    never sees half a table."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "csv": _csv_text(summaries),
        "json": json.dumps([_as_record(s) for s in summaries], indent=2) + "\n",
        "md": format_markdown(summaries),
    }
    paths = {}
    for kind, text in contents.items():
        paths[kind] = results_dir / f"{stem}.{kind}"
        write_atomically(paths[kind], text)
    return paths


def log_tables_to_run(
    run: RunRef, summaries: Sequence[FoldSummary], paths: dict[str, Path], step: int = 0
) -> None:
    """Attach the table files to the sweep's parent run (under ``tables/``) and log each
    setting's means and stds as its metrics, e.g. ``table/1pct/soft_teacher_jitter/
    cls0.9_reg0.02/teacher_AP_mean``."""
    for path in paths.values():
        log_file_artifact(run, path, artifact_path="tables")
    log_metrics(run, table_metrics(summaries), step)


def table_metrics(summaries: Iterable[FoldSummary]) -> dict[str, float]:
    """Parent-run metric name -> value, keys already valid MLflow keys."""
    metrics = {}
    for s in summaries:
        prefix = f"table/{s.ratio:g}%/{s.method}/cls{s.cls_thr:g}_reg{s.reg_thr:g}"
        for metric, mean in s.means.items():
            name = _flat_name(metric)
            metrics[sanitize_key(f"{prefix}/{name}_mean")] = mean
            metrics[sanitize_key(f"{prefix}/{name}_std")] = s.stds[metric]
    return metrics


def _setting_order(item) -> tuple:
    (ratio, method, cls_thr, reg_thr), _ = item
    known = method in METHODS
    return (ratio, 0 if known else 1, METHODS.index(method) if known else method, cls_thr, reg_thr)


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _flat_name(metric: str) -> str:
    """``teacher/AP`` -> ``teacher_AP``: one column or key segment per metric."""
    return metric.replace("/", "_")


def _column_title(metric: str) -> str:
    """``teacher/AP`` -> ``teacher mAP`` (COCO's AP is the mean over classes and IoUs)."""
    model, _, name = metric.rpartition("/")
    name = "mAP" if name == "AP" else name
    return f"{model} {name}" if model else name


def _header(summaries: Sequence[FoldSummary]) -> list[str]:
    stopped = ["stopped early"] if _any_stopped(summaries) else []
    return [*_KEY_COLUMNS, *stopped, *(_column_title(m) for m in _metric_names(summaries))]


def _any_stopped(summaries: Sequence[FoldSummary]) -> bool:
    return any(s.n_stopped for s in summaries)


def _metric_names(summaries: Sequence[FoldSummary]) -> list[str]:
    names: dict[str, None] = {}
    for s in summaries:
        names.update(dict.fromkeys(s.metric_names))
    return list(names)


def _row_cells(s: FoldSummary, with_stopped: bool) -> list[str]:
    cells = [f"{s.ratio:g}", s.method, f"{s.cls_thr:g}", f"{s.reg_thr:g}", str(s.n_folds)]
    if with_stopped:
        cells.append(str(s.n_stopped))
    for metric in _metric_names([s]):
        cell = f"{s.means[metric]:.2f} +- {s.stds[metric]:.2f}" if metric in s.means else "-"
        if metric in s.seed_stds:
            cell += f" (seeds {s.seed_stds[metric]:.2f})"
        cells.append(cell)
    return cells


def _csv_text(summaries: Sequence[FoldSummary]) -> str:
    metrics = _metric_names(summaries)
    fields = ["ratio", "method", "cls_thr", "reg_thr", "n_folds", "folds", "n_runs", "n_stopped"]
    for metric in metrics:
        name = _flat_name(metric)
        fields += [f"{name}_mean", f"{name}_std", f"{name}_seed_std"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for s in summaries:
        row = {
            "ratio": s.ratio,
            "method": s.method,
            "cls_thr": s.cls_thr,
            "reg_thr": s.reg_thr,
            "n_folds": s.n_folds,
            "folds": " ".join(str(f) for f in s.folds),
            "n_runs": s.n_runs,
            "n_stopped": s.n_stopped,
        }
        for metric in metrics:
            row[f"{_flat_name(metric)}_mean"] = s.means.get(metric, "")
            row[f"{_flat_name(metric)}_std"] = s.stds.get(metric, "")
            row[f"{_flat_name(metric)}_seed_std"] = s.seed_stds.get(metric, "")
        writer.writerow(row)
    return buffer.getvalue()


def _as_record(s: FoldSummary) -> dict:
    """JSON-safe: missing means are null, never NaN (which is not JSON)."""
    return {
        "ratio": s.ratio,
        "method": s.method,
        "cls_thr": s.cls_thr,
        "reg_thr": s.reg_thr,
        "n_folds": s.n_folds,
        "folds": list(s.folds),
        "means": {m: s.means.get(m) for m in s.metric_names},
        "stds": {m: s.stds.get(m) for m in s.metric_names},
        "seed_stds": {m: s.seed_stds.get(m) for m in s.metric_names},
        "n_runs": s.n_runs,
        "n_stopped": s.n_stopped,
        "per_fold": {m: list(values) for m, values in s.per_fold.items()},
    }
