"""Compare runs from MLflow: mean +- std of chosen metrics grouped by chosen params, and plots.

    python experiments/compare.py
    python experiments/compare.py --experiment fold_sweep,ablations --by method,ratio
    python experiments/compare.py --by method,method.indicator --metrics final/teacher/AP50
    python experiments/compare.py --plot --runs RUN_ID,RUN_ID --out experiments/results/plots
    python experiments/compare.py --parent RUN_ID --curves-md experiments/results/curves.md

With --curves-md: the --curve-metrics of --runs (default: the children of --parent or of the
newest sweep) at every evaluation step, as a Markdown table. With --plot: mAP vs labeled
ratio per method (error bars: std over folds), training curves of
--runs (default: the children of the newest sweep), pseudo-label precision/recall and IoU
scatters where logged; the PNGs are also logged under plots/ of the sweep's parent run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softteacher.track.compare import (
    DEFAULT_METRICS,
    CompareError,
    child_run_ids,
    curve_table,
    format_summary,
    group_summary,
    load_runs,
    newest_parent_run,
)
from softteacher.track.plots import PLOTS_ARTIFACT_PATH, log_plots_to_run, write_comparison_plots
from softteacher.track.stores import default_tracking_uri

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CURVE_METRICS = (
    "teacher/AP",
    "student/AP",
    "pseudo/cls_per_image",
    "pseudo_quality/precision_fg",
    "pseudo_quality/recall_fg",
)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", type=_names, default=("fold_sweep",),
                        help="MLflow experiment name(s), comma-separated")
    parser.add_argument("--by", type=_names, default=("method", "ratio"),
                        help="params to group by (method, ratio, fold, method.cls_thr, ...)")
    parser.add_argument("--metrics", type=_names, default=DEFAULT_METRICS,
                        help="metrics to reduce over each group")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else experiments/results/mlflow.db")
    parser.add_argument("--parent", default=None,
                        help="only the children of this sweep run; plots are logged to it")
    parser.add_argument("--plot", action="store_true",
                        help="write PNGs and log them to the parent run")
    parser.add_argument("--runs", type=_names, default=None,
                        help="run ids for the training curves (default: the parent's children)")
    parser.add_argument("--curves-md", type=Path, default=None,
                        help="write the runs' metrics at every evaluation step to this file")
    parser.add_argument("--curve-metrics", type=_names, default=CURVE_METRICS,
                        help="metrics of --curves-md; the first one picks the rows' steps")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plots",
                        help="folder for the PNGs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tracking_uri = args.tracking_uri or default_tracking_uri(RESULTS_DIR)
    try:
        runs = load_runs(tracking_uri, args.experiment, parent_run_id=args.parent)
        print(format_summary(group_summary(runs, args.by, args.metrics)), end="")
        if not (args.plot or args.curves_md):
            return
        parent = args.parent or newest_parent_run(tracking_uri, args.experiment[0])
        curve_runs = list(args.runs) if args.runs else child_run_ids(runs, parent)
        if args.curves_md:
            args.curves_md.parent.mkdir(parents=True, exist_ok=True)
            args.curves_md.write_text(curve_table(tracking_uri, curve_runs, args.curve_metrics))
            print(f"wrote {args.curves_md}")
        if not args.plot:
            return
        report = write_comparison_plots(
            tracking_uri, runs, args.by, args.metrics, curve_runs, args.out
        )
        log_plots_to_run(tracking_uri, parent, report.written)
    except CompareError as error:
        sys.exit(f"compare.py: {error}")
    for path in report.written:
        print(f"wrote {path}")
    for reason in report.skipped:
        print(f"skipped: {reason}")
    print(f"logged {len(report.written)} plot(s) to run {parent} under {PLOTS_ARTIFACT_PATH}/")


if __name__ == "__main__":
    main()
