"""The paper's ablations (Tables 5-10) at one labeled ratio and fold, through Ray Tune and
MLflow (experiment ``ablations``, one sweep a table), printed beside the paper's figures and
written to ``<results>/ablations_<table>_<preset>_r<ratio>_f<fold>[...].{csv,md}``.

    python experiments/ablations.py                      # every table, 10% labeled, fold 1
    python experiments/ablations.py --only table6,table7 --preset cpu
    python experiments/ablations.py --preset smoke --only table6 --rows multi_stage --max-steps 4

Tables: table6 (Tables 5-6: supervised, multi-stage, E2E, E2E+EMA, + soft teacher, + box
jittering), table7 (indicators), table8 (cls_thr), table9 (reg_thr), table10 (n_jitter).
Running the same command again resumes its sweeps: finished trials are not rerun. Every
option and input file is checked before the Ray cluster starts: a bad one is one line,
``error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softteacher.preflight import (
    INPUT_ERRORS,
    check_ablations,
    choose_dashboard_port,
    exit_on_usage_error,
    joins_cluster,
    placement_warning,
)
from softteacher.tune.ablation_tables import TABLES, AblationError
from softteacher.tune.ablations import AblationSettings, run_ablations, select_tables
from softteacher.tune.cluster import (
    ClusterAuthError,
    default_preset_and_resources,
    start_or_join,
)
from softteacher.tune.grid import SweepSettings
from softteacher.tune.options import seeds_of, shared_options
from softteacher.tune.sweep import exit_on_interrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[shared_options()],
    )
    parser.add_argument("--ratio", type=float, default=10.0, help="labeled percent (default 10)")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated tables from {', '.join(TABLES)} (default: all)",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated row keys to run, e.g. multi_stage or 0.9 "
        "(default: every row; the tables are written with a suffix)",
    )
    parser.add_argument(
        "--shared-burn-in",
        action="store_true",
        help="the semi-supervised rows branch off one supervised run at the end of burn-in "
        "(as fold_sweep.py --shared-burn-in): each trains its semi-supervised phase only",
    )
    parser.add_argument(
        "--branch-from",
        type=Path,
        default=None,
        help="an end-of-burn-in checkpoint folder of a supervised run of this preset, ratio "
        "and fold (a fold sweep's): every row but multi-stage branches off it",
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> AblationSettings:
    preset_name, resources = default_preset_and_resources(
        args.preset,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_failures=args.max_failures,
    )
    sweep = SweepSettings(
        preset=preset_name,
        ratios=(args.ratio,),
        folds=(args.fold,),
        results_dir=str(args.results_dir or SweepSettings.results_dir),
        data_dir=str(args.data_dir or SweepSettings.data_dir),
        on_bad_image=args.on_bad_image,
        coco_root=str(args.coco_root.resolve()) if args.coco_root else None,
        resources=resources,
        max_steps=args.max_steps,
        overrides=tuple(args.overrides),
        shared_burn_in=args.shared_burn_in,
        seeds=seeds_of(args),
    )
    branch_from = str(args.branch_from.resolve()) if args.branch_from else None
    return AblationSettings(sweep, branch_from=branch_from)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_usage_error(ValueError):  # the settings' and the config's own checks too
        tables = select_tables(args.only, args.rows)
        settings = check_ablations(settings_from_args(args), tables, args.address)
        port = None if joins_cluster(args.address) else choose_dashboard_port(args.dashboard_port)
    with exit_on_usage_error(ClusterAuthError):
        dashboard = start_or_join(args.address, args.num_cpus, port, args.dashboard_host)
    if joins_cluster(args.address) and (warning := placement_warning(settings.sweep.resources)):
        print(f"warning: {warning}", file=sys.stderr)
    if dashboard:
        print(f"Ray dashboard: {dashboard}")
    with exit_on_interrupt(), exit_on_usage_error(AblationError, *INPUT_ERRORS):
        run_ablations(settings, tables)


if __name__ == "__main__":
    main()
