"""Figures of a comparison: mAP vs labeled ratio, training curves, pseudo-label quality (Fig. 3).

Figures are drawn on matplotlib's Agg canvas without pyplot: importing this never switches
a notebook's or GUI's backend, and no figure lingers in pyplot's global registry.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from softteacher.track.compare import (
    CompareError,
    UnknownFieldError,
    count_column,
    group_summary,
    mean_column,
    std_column,
    summary_keys,
    summary_metrics,
)
from softteacher.track.mlflow_runs import RunRef, log_file_artifact

DEFAULT_CURVE_METRICS = (
    "loss/total",
    "loss/sup_cls",
    "loss/sup_reg",
    "loss/sup_rpn_objectness",
    "loss/sup_rpn_box",
    "loss/unsup_cls",
    "loss/unsup_reg",
    "loss/unsup_rpn_objectness",
    "loss/unsup_rpn_box",
    "pseudo/cls_per_image",
    "teacher/AP",
    "student/AP",
)
PSEUDO_BOXES_ARTIFACT = "pseudo_quality_boxes.json"
PLOTS_ARTIFACT_PATH = "plots"
# keys that vary per fold or run, never a line of their own in the mAP-vs-ratio plot
_PER_FOLD_KEYS = ("ratio", "fold", "seed")
_THRESHOLD_KEY = re.compile(r"pseudo_quality/(precision|recall)_(\d+(?:\.\d+)?)")
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_DPI = 100


class MissingPlotDataError(CompareError):
    """The runs lack what a figure needs (no pseudo_quality metrics, no box artifact)."""


@dataclass
class PlotReport:
    """What ``write_comparison_plots`` drew and what it skipped (with the reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def plot_map_vs_ratio(summary: pd.DataFrame, metric: str, out: Path) -> Path:
    """One line per method (and any other non-fold key) over the labeled ratios on a log
    axis, error bars = the std over folds; lines are nudged apart so the bars stay legible."""
    keys = summary_keys(summary)
    if "ratio" not in keys:
        raise CompareError("mAP vs ratio needs a summary grouped by ratio (--by method,ratio)")
    if metric not in summary_metrics(summary):
        raise UnknownFieldError(
            f"the summary has no metric {metric!r}; it has {', '.join(summary_metrics(summary))}"
        )
    rows = summary[summary["ratio"].map(lambda r: isinstance(r, float) and r > 0)]
    rows = rows[rows[count_column(metric)] > 0]
    if rows.empty:
        raise MissingPlotDataError(f"no group has both a positive numeric ratio and {metric}")
    line_keys = [k for k in keys if k != "ratio"]
    members: dict[tuple, list] = {}
    for index, row in rows.iterrows():
        members.setdefault(tuple(row[k] for k in line_keys), []).append(index)
    lines = {key: rows.loc[index].sort_values("ratio") for key, index in members.items()}
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    for position, (key, group) in enumerate(lines.items()):
        nudge = 10 ** ((position - (len(lines) - 1) / 2) * 0.012)
        ax.errorbar(
            group["ratio"].to_numpy(float) * nudge,
            group[mean_column(metric)].to_numpy(float),
            yerr=group[std_column(metric)].to_numpy(float),
            marker="o",
            capsize=4,
            label=", ".join(_label(v) for v in key) or metric,
        )
    ratios = sorted(set(rows["ratio"]))
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}%" for r in ratios])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labeled data")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs labeled ratio (mean +- std over folds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def plot_training_curves(
    tracking_uri: str, run_ids: Sequence[str], metrics: Sequence[str], out: Path
) -> Path:
    """One subplot per metric with a line per run over steps; metrics that none of the runs
    logged (a supervised run has no unsup losses) get no subplot."""
    client = MlflowClient(tracking_uri)
    runs = [_get_run(client, tracking_uri, run_id) for run_id in run_ids]
    curves = {
        metric: {run.info.run_id: _history(client, run.info.run_id, metric) for run in runs}
        for metric in metrics
    }
    drawn = [m for m in metrics if any(curves[m].values())]
    if not drawn:
        raise MissingPlotDataError(
            f"none of the {len(runs)} runs logged any of {', '.join(metrics)}; no training curves"
        )
    ncols = min(3, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    fig = _figure(4.2 * ncols, 2.8 * nrows + 0.3 * math.ceil(len(runs) / 3) + 0.6)
    colors = _colors(len(runs))
    handles = {}
    for index, metric in enumerate(drawn):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for run, color in zip(runs, colors, strict=True):
            points = curves[metric][run.info.run_id]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            marker = "o" if len(points) <= 20 else None
            (line,) = ax.plot(steps, values, color=color, marker=marker, markersize=3, lw=1.2)
            handles.setdefault(run.info.run_name or run.info.run_id, line)
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncols=min(3, len(handles)),
        fontsize="small",
    )
    return _save(fig, out)


def plot_pseudo_precision_recall(tracking_uri: str, run_ids: Sequence[str], out: Path) -> Path:
    """Fig. 3a: precision and recall of the pseudo boxes vs the foreground-score threshold,
    from each run's latest ``pseudo_quality/precision_<t>``/``recall_<t>``; a star marks the
    run's own ``cls_thr`` (``precision_fg``/``recall_fg``)."""
    client = MlflowClient(tracking_uri)
    runs = [_get_run(client, tracking_uri, run_id) for run_id in run_ids]
    with_data = [run for run in runs if _threshold_curves(run.data.metrics)]
    if not with_data:
        raise MissingPlotDataError(
            f"none of the {len(runs)} runs has pseudo_quality/precision_<t> metrics (logged at "
            "evaluation steps of soft-teacher training); no precision/recall plot"
        )
    fig = _figure(7.0, 4.8 + 0.3 * math.ceil(len(with_data) / 2))
    ax = fig.add_subplot()
    for run, color in zip(with_data, _colors(len(with_data)), strict=True):
        name = run.info.run_name or run.info.run_id
        for kind, style in (("precision", "-o"), ("recall", "--s")):
            curve = _threshold_curves(run.data.metrics).get(kind, {})
            if curve:
                thresholds = sorted(curve)
                values = [curve[t] for t in thresholds]
                ax.plot(thresholds, values, style, color=color, label=f"{name} {kind}", ms=4)
            at_fg = run.data.metrics.get(f"pseudo_quality/{kind}_fg")
            cls_thr = _cls_thr(run)
            if at_fg is not None and cls_thr is not None:
                ax.plot([cls_thr], [at_fg], "*", color=color, ms=12, mec="black", mew=0.5)
    ax.set_xlabel("foreground score threshold")
    ax.set_ylabel("precision / recall")
    ax.set_title("Pseudo-box precision and recall vs threshold (Fig. 3a; star: run's cls_thr)")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return _save(fig, out)


def plot_pseudo_scatter(tracking_uri: str, run_id: str, out: Path) -> tuple[Path, Path]:
    """Fig. 3b/3c: box IoU with its ground truth vs foreground score, and vs jitter variance,
    from the run's ``pseudo_quality_boxes.json``; written into the folder ``out`` as
    ``<run name>_iou_vs_score.png`` and ``<run name>_iou_vs_variance.png``."""
    client = MlflowClient(tracking_uri)
    run = _get_run(client, tracking_uri, run_id)
    name = run.info.run_name or run_id
    if PSEUDO_BOXES_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        raise MissingPlotDataError(
            f"run {run_id} ({name}) has no {PSEUDO_BOXES_ARTIFACT} artifact; "
            "its IoU scatter plots are skipped"
        )
    with tempfile.TemporaryDirectory(prefix="softteacher-plot-") as tmp:
        local = Path(client.download_artifacts(run_id, PSEUDO_BOXES_ARTIFACT, tmp))
        iou, score, variance = _read_boxes(local, run_id)
    stem = _UNSAFE_FILE_CHARS.sub("_", name)
    out = Path(out)
    by_score = _scatter(
        score,
        iou,
        "foreground score",
        f"IoU vs foreground score (Fig. 3b)\n{name}",
        out / f"{stem}_iou_vs_score.png",
    )
    by_variance = _scatter(
        variance,
        iou,
        "box jitter variance",
        f"IoU vs box variance (Fig. 3c)\n{name}",
        out / f"{stem}_iou_vs_variance.png",
    )
    return by_score, by_variance


def write_comparison_plots(
    tracking_uri: str,
    runs: pd.DataFrame,
    by: Sequence[str],
    metrics: Sequence[str],
    curve_run_ids: Sequence[str],
    out_dir: Path,
) -> PlotReport:
    """Every figure the data allow: mAP vs ratio per metric (grouped by method, ratio and the
    other non-fold ``by`` keys), training curves and pseudo-label quality of ``curve_run_ids``.
    A figure whose data are missing is skipped with its reason instead of failing the rest."""
    out_dir = Path(out_dir)
    report = PlotReport()
    bare_by = [b.removeprefix("params.") for b in by]
    plot_by = ["method", *(b for b in bare_by if b not in ("method", *_PER_FOLD_KEYS)), "ratio"]
    for metric in metrics:
        try:
            summary = group_summary(runs, plot_by, [metric])
            name = f"map_vs_ratio_{_UNSAFE_FILE_CHARS.sub('_', metric.removeprefix('metrics.'))}"
            report.written.append(
                plot_map_vs_ratio(summary, summary_metrics(summary)[0], out_dir / f"{name}.png")
            )
        except CompareError as error:
            report.skipped.append(f"mAP vs ratio of {metric}: {error}")
    if not curve_run_ids:
        report.skipped.append("training curves and pseudo-label plots: no runs selected")
        return report
    try:
        report.written.append(
            plot_training_curves(
                tracking_uri, curve_run_ids, DEFAULT_CURVE_METRICS, out_dir / "training_curves.png"
            )
        )
    except MissingPlotDataError as error:
        report.skipped.append(str(error))
    try:
        report.written.append(
            plot_pseudo_precision_recall(
                tracking_uri, curve_run_ids, out_dir / "pseudo_precision_recall.png"
            )
        )
    except MissingPlotDataError as error:
        report.skipped.append(str(error))
    without_boxes = 0
    for run_id in curve_run_ids:
        try:
            report.written.extend(plot_pseudo_scatter(tracking_uri, run_id, out_dir))
        except MissingPlotDataError:
            without_boxes += 1
    if without_boxes:
        report.skipped.append(
            f"IoU scatter plots: {without_boxes} of {len(curve_run_ids)} runs have no "
            f"{PSEUDO_BOXES_ARTIFACT} artifact"
        )
    return report


def log_plots_to_run(tracking_uri: str, run_id: str, paths: Sequence[Path]) -> None:
    """Attach the PNGs to a run (the sweep's parent) under ``plots/``."""
    client = MlflowClient(tracking_uri)
    run = _get_run(client, tracking_uri, run_id)
    ref = RunRef(tracking_uri, run_id, run.info.experiment_id)
    for path in paths:
        log_file_artifact(ref, path, artifact_path=PLOTS_ARTIFACT_PATH)


def _figure(width_in: float, height_in: float) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def _colors(count: int) -> list:
    """tab10 up to 10 lines, tab20 beyond (repeating past 20)."""
    palette = colormaps["tab10" if count <= 10 else "tab20"].colors
    return [palette[i % len(palette)] for i in range(count)]


def _get_run(client: MlflowClient, tracking_uri: str, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise CompareError(
            f"MLflow run {run_id!r} not found at {tracking_uri}; check --runs/--parent"
        ) from error


def _history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) in step order; the last value wins when a step was logged twice
    (a resumed run repeats the steps after its checkpoint)."""
    by_step = {}
    for entry in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp):
        by_step[entry.step] = entry.value
    return sorted(by_step.items())


def _threshold_curves(metrics: dict[str, float]) -> dict[str, dict[float, float]]:
    curves: dict[str, dict[float, float]] = {}
    for key, value in metrics.items():
        match = _THRESHOLD_KEY.fullmatch(key)
        if match:
            curves.setdefault(match.group(1), {})[float(match.group(2))] = value
    return curves


def _cls_thr(run: Run) -> float | None:
    try:
        return float(run.data.params["method.cls_thr"])
    except (KeyError, ValueError):
        return None


def _read_boxes(path: Path, run_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU, score and variance arrays (NaN where a box has no variance: no jittering)."""
    data = json.loads(path.read_text())
    boxes = data.get("boxes") if isinstance(data, dict) else data
    if not isinstance(boxes, list) or not all(
        isinstance(b, dict) and "iou" in b and "score" in b for b in boxes
    ):
        raise CompareError(
            f"{PSEUDO_BOXES_ARTIFACT} of run {run_id} is not a list of "
            '{"iou", "score", "variance"} records; rewrite it in that form'
        )

    def column(name: str) -> np.ndarray:
        return np.array([_number(b.get(name)) for b in boxes], dtype=float)

    return column("iou"), column("score"), column("variance")


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scatter(x: np.ndarray, y: np.ndarray, x_label: str, title: str, out: Path) -> Path:
    """A scatter with its Pearson correlation in the title (``n/a`` under 2 distinct points)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=8, alpha=0.4, edgecolors="none")
    ax.set_xlabel(x_label)
    ax.set_ylabel("IoU with ground truth")
    ax.set_title(f"{title}\n{len(x)} boxes, Pearson r = {_pearson(x, y)}", fontsize="medium")
    ax.grid(True, alpha=0.3)
    return _save(fig, out)


def _pearson(x: np.ndarray, y: np.ndarray) -> str:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return "n/a"
    return f"{np.corrcoef(x, y)[0, 1]:.2f}"


def _label(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)
