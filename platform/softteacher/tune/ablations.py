"""The paper's ablation studies (Tables 5-10) at one labeled ratio and fold, on the platform.

Each table is data here: its rows, what each row changes in a trial, and the paper's figures
(COCO val2017 mAP, AP50, AP75 at 10% labeled, fold 1; paper Sec. 4.4). A table runs as one
sweep (``run_sweep`` with explicit trial specs, MLflow experiment ``ablations``), and is
printed and written with our teacher's mAP, AP50 and AP75 beside the paper's.

Rows the paper does not pin are filled from the preset: the foreground threshold (``cls_thr``,
which serves the classification and RPN pseudo boxes) and the box-variance threshold default
to the preset's ``cls_thr`` and ``reg_thr``, as in ``experiments/fold_sweep.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from softteacher.config import ExperimentConfig
from softteacher.files import write_atomically
from softteacher.names import TEACHER_AP, model_metric
from softteacher.track.mlflow_runs import (
    finish_run,
    log_file_artifact,
    resume_parent_run,
)
from softteacher.track.render import markdown_table, plain_table
from softteacher.track.stores import default_tracking_uri
from softteacher.train.checkpoint import CheckpointError, checkpoint_step
from softteacher.tune.ablation_tables import (
    TABLES,
    AblationError,
    AblationRow,
    AblationTable,
)
from softteacher.tune.grid import SweepSettings, TrialSpec
from softteacher.tune.sweep import FinishedTrial, run_sweep

EXPERIMENT_NAME = "ablations"
# Ours: the teacher's COCO metrics (MMDetection 3 reports the teacher; the paper's column
# names are mAP, mAP@0.5 and mAP@0.75).
METRIC_COLUMNS = tuple(
    (column, model_metric("teacher", name))
    for column, name in (("mAP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"))
)


@dataclass(frozen=True)
class AblationSettings:
    """An ablation request: a sweep's settings at one ratio and one fold (everything the
    fold sweep's command line also decides: preset, data, resources, steps, ``--set``,
    seeds, shared burn-in), and optionally an existing branch point. Each table becomes
    one sweep of ``sweep`` whose grid is the table's rows (``sweep_settings``)."""

    sweep: SweepSettings = field(default_factory=lambda: SweepSettings(ratios=(10.0,), folds=(1,)))
    # an existing end-of-burn-in checkpoint of this preset, ratio and fold: every row but
    # multi-stage (whose first stage is a whole supervised run) branches off it
    branch_from: str | None = None

    def __post_init__(self) -> None:
        if len(self.sweep.ratios) != 1 or len(self.sweep.folds) != 1:
            raise AblationError(
                "an ablation table compares its rows at one ratio and one fold; got ratios "
                f"{list(self.sweep.ratios)} and folds {list(self.sweep.folds)}"
            )
        if self.sweep.shared_burn_in and self.branch_from:
            raise AblationError(
                "--shared-burn-in runs its own burn-in and --branch-from takes an existing "
                "one; choose one"
            )

    @property
    def ratio(self) -> float:
        return self.sweep.ratios[0]

    @property
    def fold(self) -> int:
        return self.sweep.folds[0]

    def base_config(self) -> ExperimentConfig:
        """The trials' config before a row changes it, built as their sweep builds it."""
        return self.sweep.base_config()

    def _name_parts(self, table: AblationTable) -> list[str]:
        """What tells this request's trials apart from another's, in name-sized pieces."""
        sweep = self.sweep
        parts = [EXPERIMENT_NAME, table.key, sweep.preset, f"r{self.ratio:g}", f"f{self.fold}"]
        if sweep.coco_root:
            parts.append("coco")
        if sweep.max_steps is not None:
            parts.append(f"steps{sweep.max_steps}")
        if sweep.overrides:
            digest = hashlib.sha256("\n".join(sweep.overrides).encode()).hexdigest()[:8]
            parts.append(f"set-{digest}")
        if sweep.shared_burn_in:
            parts.append("shared")
        if self.branch_from:
            parts.append("branch-" + hashlib.sha256(self.branch_from.encode()).hexdigest()[:8])
        if sweep.seeds is not None:
            parts.append("s" + "-".join(str(seed) for seed in sweep.seeds))
        return parts

    def sweep_name(self, table: AblationTable, *, partial: bool = False) -> str:
        """``ablations-table6-cpu-r10-f1`` (+ what else changes the trials): a rerun of the
        same command resumes its sweep, and a different request never resumes another's."""
        name = "-".join(self._name_parts(table))
        if partial:
            name += "-rows-" + "-".join(row.key for row in table.rows)
        return name

    def table_stem(self, table: AblationTable, *, partial: bool = False) -> str:
        """``ablations_table6_cpu_r10_f1`` (+ the same pieces as the sweep's name, then the
        rows of a cut-down table): another ratio, fold or schedule never overwrites it."""
        stem = "_".join(self._name_parts(table))
        if partial:
            stem += "_" + "-".join(row.key for row in table.rows)
        return stem

    def sweep_settings(self, table: AblationTable, *, partial: bool = False) -> SweepSettings:
        return dataclasses.replace(
            self.sweep,
            methods=tuple(dict.fromkeys(row.method for row in table.rows)),
            experiment_name=EXPERIMENT_NAME,
            sweep_name=self.sweep_name(table, partial=partial),
        )

    def specs(self, table: AblationTable) -> list[TrialSpec]:
        """Each row's trials, one a seed, row after row."""
        defaults = self.base_config().method
        specs = [
            dataclasses.replace(row.spec(self.ratio, self.fold, defaults), seed=seed)
            for row in table.rows
            for seed in self.sweep.seeds or (None,)
        ]
        if not self.branch_from:
            return specs
        return [
            s if s.method == "multi_stage" else dataclasses.replace(s, branch_from=self.branch_from)
            for s in specs
        ]

    def check_branch_point(self) -> None:
        """A branch point must be a checkpoint saved at the end of this preset's burn-in."""
        if not self.branch_from:
            return
        burn_in = self.base_config().method.burn_in_steps
        try:
            step = checkpoint_step(Path(self.branch_from))
        except (FileNotFoundError, CheckpointError) as error:
            raise AblationError(f"--branch-from: {error}") from None
        if step != burn_in:
            raise AblationError(
                f"--branch-from {self.branch_from} was saved at step {step}, and the "
                f"{self.sweep.preset} preset's burn-in ends at step {burn_in}; pass the checkpoint "
                "its supervised run saved at that step"
            )


@dataclass(frozen=True)
class RowResult:
    """A row's trials, one a seed, with each one's final metrics (None: did not finish)."""

    row: AblationRow
    specs: tuple[TrialSpec, ...]
    metrics: tuple[dict[str, float] | None, ...]

    @property
    def finished(self) -> bool:
        return all(m is not None for m in self.metrics)

    def values(self, metric: str) -> list[float]:
        """The metric's finite values over the seeds that finished (pycocotools leaves an AP
        undefined, NaN, when the val set has no object of its size)."""
        found = [m[metric] for m in self.metrics if m is not None and metric in m]
        return [float(v) for v in found if math.isfinite(float(v))]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        """The sample std over seeds: the run-to-run noise of this row (None: < 2 seeds)."""
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class AblationResult:
    table: AblationTable
    rows: list[RowResult]
    paths: dict[str, Path]
    wall_s: float

    @property
    def complete(self) -> bool:
        return all(r.finished for r in self.rows)


def select_tables(only: str | None = None, rows: str | None = None) -> list[AblationTable]:
    """The tables of ``only`` (``table6,table8``; None: all) in the paper's order, restricted
    to the row keys of ``rows`` (``multi_stage,0.9``; None: every row) where given."""
    keys = [k.strip() for k in (only or "").split(",") if k.strip()] or list(TABLES)
    unknown = [k for k in keys if k not in TABLES]
    if unknown:
        raise AblationError(f"unknown table(s) {unknown}; choose from {', '.join(TABLES)}")
    tables = [TABLES[k] for k in TABLES if k in keys]
    row_keys = [k.strip() for k in (rows or "").split(",") if k.strip()]
    if not row_keys:
        return tables
    known = {row.key for table in tables for row in table.rows}
    missing = [k for k in row_keys if k not in known]
    if missing:
        raise AblationError(
            f"no chosen table has row(s) {missing}; rows: "
            + "; ".join(f"{t.key}: {', '.join(r.key for r in t.rows)}" for t in tables)
        )
    chosen = [t.select([k for k in row_keys if k in {r.key for r in t.rows}]) for t in tables]
    return [t for t in chosen if t.rows]


def run_ablations(
    settings: AblationSettings, tables: Sequence[AblationTable] | None = None
) -> list[AblationResult]:
    """Run the tables (all by default) one after the other, each as its own sweep."""
    settings.check_branch_point()
    return [run_ablation_table(settings, table) for table in (tables or list(TABLES.values()))]


def run_ablation_table(settings: AblationSettings, table: AblationTable) -> AblationResult:
    """One table as one sweep; prints it and writes it as CSV and Markdown (``table_stem``),
    attached to the sweep's MLflow run too. A table cut down to some rows gets their keys
    appended to its sweep and file names, so it never resumes or overwrites the full one."""
    partial = table.rows != TABLES[table.key].rows
    sweep = settings.sweep_settings(table, partial=partial)
    specs = settings.specs(table)
    started = time.monotonic()
    finished = run_sweep(sweep, specs).finished
    wall_s = time.monotonic() - started
    rows = collect_rows(table, specs, finished)
    print(format_ablation_table(table, rows, settings, wall_s))
    stem = settings.table_stem(table, partial=partial)
    paths = write_ablation_table(
        table, rows, Path(settings.sweep.results_dir), stem, settings, wall_s
    )
    for path in paths.values():
        print(f"wrote {path}")
    result = AblationResult(table, rows, paths, wall_s)
    _attach_to_sweep_run(sweep, paths, complete=result.complete)
    return result


def collect_rows(
    table: AblationTable, specs: Sequence[TrialSpec], finished: Sequence[FinishedTrial]
) -> list[RowResult]:
    """Each row with its trials' metrics; ``specs`` are ``table.rows``' trials, row after
    row, as many a row (one a seed) as ``AblationSettings.specs`` makes."""
    per_row, rest = divmod(len(specs), len(table.rows))
    if rest or not per_row:
        raise ValueError(f"{len(specs)} trials do not divide among {len(table.rows)} rows")
    by_spec = {trial.spec: trial.metrics for trial in finished}
    rows = []
    for index, row in enumerate(table.rows):
        trials = tuple(specs[index * per_row : (index + 1) * per_row])
        rows.append(RowResult(row, trials, tuple(by_spec.get(spec) for spec in trials)))
    return rows


def format_ablation_table(
    table: AblationTable,
    rows: Sequence[RowResult],
    settings: AblationSettings | None = None,
    wall_s: float | None = None,
) -> str:
    """Aligned text as the paper prints it (one decimal), ours then the paper's figures."""
    body = plain_table(_header(table), [_cells(r) for r in rows])
    note = noise_note(rows)
    return f"{_title(table, settings, wall_s)}\n{body}" + (f"\n{note}" if note else "")


def format_ablation_markdown(
    table: AblationTable,
    rows: Sequence[RowResult],
    settings: AblationSettings | None = None,
    wall_s: float | None = None,
) -> str:
    body = markdown_table(_header(table), [_cells(r) for r in rows])
    note = noise_note(rows)
    return f"**{_title(table, settings, wall_s)}**\n\n{body}" + (f"\n\n{note}\n" if note else "")


def ablation_csv(table: AblationTable, rows: Sequence[RowResult]) -> str:
    """Machine-readable: full-precision numbers, empty where no trial of the row finished;
    ``row`` is the ablated value (a method, an indicator, a threshold), ``label`` the paper's
    name; with several seeds a metric is the mean over them and ``<metric>_std`` their std."""
    fields = ["table", "row", "label", "method", "trial", "seeds", "finished"]
    fields += [name for name, _ in METRIC_COLUMNS] + [f"{n}_std" for n, _ in METRIC_COLUMNS]
    fields += [f"paper_{n}" for n, _ in METRIC_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for result in rows:
        record = {
            "table": table.key,
            "row": result.row.key,
            "label": result.row.label,
            "method": result.row.method,
            "trial": ";".join(spec.name for spec in result.specs),
            "seeds": ";".join("" if s.seed is None else str(s.seed) for s in result.specs),
            "finished": sum(m is not None for m in result.metrics),
        }
        for name, metric in METRIC_COLUMNS:
            record[name] = result.mean(metric)
            record[f"{name}_std"] = result.std(metric)
            record[f"paper_{name}"] = result.row.paper.value(name)
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


def write_ablation_table(
    table: AblationTable,
    rows: Sequence[RowResult],
    results_dir: Path,
    stem: str,
    settings: AblationSettings | None = None,
    wall_s: float | None = None,
) -> dict[str, Path]:
    """``<stem>.csv`` and ``<stem>.md``, each replaced atomically."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "csv": ablation_csv(table, rows),
        "md": format_ablation_markdown(table, rows, settings, wall_s),
    }
    paths = {}
    for kind, text in contents.items():
        paths[kind] = results_dir / f"{stem}.{kind}"
        write_atomically(paths[kind], text)
    return paths


def _attach_to_sweep_run(sweep: SweepSettings, paths: dict[str, Path], *, complete: bool) -> None:
    """The table files as artifacts of the sweep's parent run (``tables/``); the run is set
    FINISHED again only when every row finished (a failed trial leaves it for a rerun)."""
    tracking_uri = default_tracking_uri(Path(sweep.results_dir))
    parent = resume_parent_run(tracking_uri, EXPERIMENT_NAME, sweep.name)
    if parent is None:
        return
    for path in paths.values():
        log_file_artifact(parent, path, artifact_path="tables")
    if complete:
        finish_run(parent)


def _title(table: AblationTable, settings: AblationSettings | None, wall_s: float | None) -> str:
    title = table.caption
    if settings is not None:
        sweep = settings.sweep
        title += f" -- {sweep.preset} preset, {settings.ratio:g}% labeled, fold {settings.fold}"
        if sweep.seeds is not None and len(sweep.seeds) > 1:
            title += f", mean +- std over seeds {','.join(map(str, sweep.seeds))}"
    if wall_s is not None:
        title += f", {wall_s / 60:.1f} min"
    return title + " (ours: teacher; paper: COCO val2017, 10%, fold 1)"


def noise_note(rows: Sequence[RowResult], metric: str = TEACHER_AP) -> str | None:
    """How to read the rows against each other: the std over seeds pooled over rows (the
    run-to-run noise); a difference between two rows' means under twice it is no
    difference. None with fewer than two seeds a row."""
    variances = [std**2 for r in rows if (std := r.std(metric)) is not None]
    if not variances:
        return None
    noise = math.sqrt(statistics.fmean(variances))
    return (
        f"run-to-run noise (std over seeds, pooled over {len(variances)} rows): "
        f"{noise:.1f} mAP; rows whose means differ by less than {2 * noise:.1f} do not differ"
    )


def _header(table: AblationTable) -> list[str]:
    names = [name for name, _ in METRIC_COLUMNS]
    return [table.setting, *names, *(f"paper {name}" for name in names)]


def _cells(result: RowResult) -> list[str]:
    cells = [result.row.label]
    cells += [_mean_std(result, metric) for _, metric in METRIC_COLUMNS]
    cells += [f"{result.row.paper.value(name):.1f}" for name, _ in METRIC_COLUMNS]
    return cells


def _mean_std(result: RowResult, metric: str) -> str:
    """``12.3``, ``12.3 +- 0.4`` over several seeds, ``-`` when no seed has a value."""
    mean, std = result.mean(metric), result.std(metric)
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} +- {std:.1f}"
