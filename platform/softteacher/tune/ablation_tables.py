"""The paper's ablation tables (Tables 5-10) as data: their rows, what each row changes in a
trial, and the paper's figures (COCO val2017 mAP, AP50, AP75 at 10% labeled, fold 1; paper
Sec. 4.4). ``ablations.py`` runs them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from softteacher.config import INDICATORS, METHODS, MethodConfig
from softteacher.tune.grid import TrialSpec


class AblationError(ValueError):
    """An ablation request that names no known table or row."""


@dataclass(frozen=True)
class PaperFigures:
    """One row of a paper table: COCO val2017 mAP, AP50 and AP75 (percent)."""

    mAP: float
    AP50: float
    AP75: float

    def value(self, column: str) -> float:
        return getattr(self, column)


@dataclass(frozen=True)
class AblationRow:
    """One row: the label the paper prints, a short ``key`` for ``--rows`` and file names,
    what the trial changes (None: the preset's value), and the paper's figures."""

    key: str
    label: str
    paper: PaperFigures
    method: str
    cls_thr: float | None = None
    reg_thr: float | None = None
    indicator: str | None = None
    n_jitter: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AblationError(f"row {self.key!r}: unknown method {self.method!r}; use {METHODS}")
        if self.indicator is not None and self.indicator not in INDICATORS:
            raise AblationError(f"row {self.key!r}: unknown indicator {self.indicator!r}")

    def spec(self, ratio: float, fold: int, defaults: MethodConfig) -> TrialSpec:
        return TrialSpec(
            ratio=ratio,
            fold=fold,
            method=self.method,
            cls_thr=defaults.cls_thr if self.cls_thr is None else self.cls_thr,
            reg_thr=defaults.reg_thr if self.reg_thr is None else self.reg_thr,
            indicator=self.indicator,
            n_jitter=self.n_jitter,
        )


@dataclass(frozen=True)
class AblationTable:
    """A paper table: ``setting`` heads the row-label column."""

    key: str
    caption: str
    setting: str
    rows: tuple[AblationRow, ...]

    def select(self, row_keys: Sequence[str] | None) -> AblationTable:
        """The table restricted to ``row_keys`` (all rows for None), in the paper's order."""
        if row_keys is None:
            return self
        unknown = sorted(set(row_keys) - {row.key for row in self.rows})
        if unknown:
            raise AblationError(
                f"{self.key} has no row(s) {unknown}; its rows are "
                f"{[row.key for row in self.rows]}"
            )
        rows = tuple(row for row in self.rows if row.key in row_keys)
        return AblationTable(self.key, self.caption, self.setting, rows)


def _paper(mAP: float, AP50: float, AP75: float) -> PaperFigures:
    return PaperFigures(mAP, AP50, AP75)


# Tables 5 and 6 share the E2E+EMA row; table7's "w/o weight" and BG-T rows repeat Table 6's
# E2E+EMA and soft-teacher figures, and Tables 8-10 are all around the full method, as the
# paper's figures show (0.9 in Table 8 is Table 6's soft teacher without jittering, 33.6).
TABLES: dict[str, AblationTable] = {
    table.key: table
    for table in (
        AblationTable(
            "table6",
            "Tables 5-6: multi-stage vs end-to-end, soft teacher and box jittering",
            "method",
            (
                AblationRow("supervised", "Supervised", _paper(27.1, 44.6, 28.6), "supervised"),
                AblationRow("multi_stage", "Multi-Stage", _paper(28.7, 47.0, 30.9), "multi_stage"),
                AblationRow("e2e", "E2E", _paper(30.0, 47.4, 32.4), "e2e"),
                AblationRow("e2e_ema", "E2E+EMA", _paper(31.2, 48.8, 34.0), "e2e_ema"),
                AblationRow(
                    "soft_teacher", "E2E+EMA + soft teacher", _paper(33.6, 52.9, 36.6),
                    "soft_teacher",
                ),
                AblationRow(
                    "soft_teacher_jitter", "E2E+EMA + soft teacher + box jittering",
                    _paper(34.2, 52.6, 37.3), "soft_teacher_jitter",
                ),
            ),
        ),
        AblationTable(
            "table7",
            "Table 7: reliability indicators of the soft teacher",
            "indicator",
            tuple(
                AblationRow(indicator, label, figures, "soft_teacher", indicator=indicator)
                for indicator, label, figures in (
                    ("none", "w/o weight", _paper(31.2, 48.8, 34.0)),
                    ("iou", "IoU", _paper(31.7, 51.4, 34.2)),
                    ("reverse_iou", "Reverse-IoU", _paper(31.6, 49.5, 34.1)),
                    ("pred_diff", "Pred-Diff", _paper(32.3, 51.0, 34.6)),
                    ("bg_student", "BG-S", _paper(25.9, 44.4, 27.0)),
                    ("bg_teacher", "BG-T", _paper(33.6, 52.9, 36.6)),
                )
            ),
        ),
        AblationTable(
            "table8",
            "Table 8: foreground score threshold (soft teacher)",
            "cls_thr",
            tuple(
                AblationRow(f"{thr:g}", f"{thr:.2f}", figures, "soft_teacher", cls_thr=thr)
                for thr, figures in (
                    (0.7, _paper(29.9, 48.6, 32.1)),
                    (0.8, _paper(33.2, 52.8, 35.9)),
                    (0.9, _paper(33.6, 52.9, 36.6)),
                    (0.95, _paper(32.1, 50.6, 34.7)),
                )
            ),
        ),
        AblationTable(
            "table9",
            "Table 9: box-regression variance threshold (soft teacher + box jittering)",
            "reg_thr",
            tuple(
                AblationRow(f"{thr:g}", f"{thr:.2f}", figures, "soft_teacher_jitter", reg_thr=thr)
                for thr, figures in (
                    (0.04, _paper(33.8, 52.3, 36.7)),
                    (0.03, _paper(34.0, 52.5, 36.9)),
                    (0.02, _paper(34.2, 52.6, 37.3)),
                    (0.01, _paper(32.9, 52.2, 35.8)),
                )
            ),
        ),
        AblationTable(
            "table10",
            "Table 10: jittered boxes a candidate (soft teacher + box jittering)",
            "n_jitter",
            tuple(
                AblationRow(str(n), str(n), figures, "soft_teacher_jitter", n_jitter=n)
                for n, figures in (
                    (5, _paper(34.0, 52.3, 37.0)),
                    (10, _paper(34.2, 52.6, 37.3)),
                    (15, _paper(34.2, 52.5, 37.4)),
                )
            ),
        ),
    )
}
