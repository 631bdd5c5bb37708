"""The whole protocol: for each labeled ratio and fold, a Ray Tune sweep of the thresholds.

python experiments/fold_sweep.py --ratios 1,5,10
python experiments/fold_sweep.py --preset smoke --ratios 10 --folds 1 --baseline
python experiments/fold_sweep.py --coco-root /data/coco --preset paper \
        --workers 8 --gpus-per-worker 1
python experiments/fold_sweep.py --ratios 10 --folds 1 --fg-thr 0.5,0.7,0.9 \
        --var-thr 0.01,0.02,0.05 --scheduler asha --set train.eval_every=75
python experiments/fold_sweep.py --preset smoke --set method.unsup_weight=1 \
        --set optim.decay_steps=8,10

Every option and input file is checked before the Ray cluster starts: a bad one is one
line, ``error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from softteacher.config import METHODS
from softteacher.preflight import (
    INPUT_ERRORS,
    check_sweep,
    choose_dashboard_port,
    exit_on_usage_error,
    joins_cluster,
    placement_warning,
)
from softteacher.tune.cluster import (
    ClusterAuthError,
    default_preset_and_resources,
    start_or_join,
)
from softteacher.tune.grid import EarlyStopping, SweepSettings
from softteacher.tune.options import seeds_of, shared_options
from softteacher.tune.sweep import exit_on_interrupt, run_sweep


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(v for v in text.split(",") if v)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {METHODS}")
    return methods


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[shared_options()],
    )
    parser.add_argument("--ratios", type=_floats, default=(1.0, 5.0, 10.0), help="labeled percents")
    parser.add_argument("--folds", type=_ints, default=(1, 2, 3, 4, 5))
    parser.add_argument(
        "--method",
        type=_methods,
        default=("soft_teacher_jitter",),
        help=f"comma-separated, from {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--fg-thr",
        "--cls-thr",
        dest="cls_thrs",
        type=_floats,
        default=None,
        help="foreground thresholds to sweep (method.cls_thr, which also sets method.rpn_thr; "
        "default: the preset's)",
    )
    parser.add_argument(
        "--var-thr",
        "--reg-thr",
        dest="reg_thrs",
        type=_floats,
        default=None,
        help="box-variance thresholds to sweep (method.reg_thr; default: the preset's)",
    )
    parser.add_argument(
        "--baseline", action="store_true", help="add the supervised run per (ratio, fold)"
    )
    parser.add_argument(
        "--shared-burn-in",
        action="store_true",
        help="semi-supervised runs branch off the supervised run (added when --baseline is "
        "not given) at the end of burn-in: both arms share one burn-in, and each "
        "semi-supervised trial trains only its semi-supervised phase",
    )
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument(
        "--scheduler",
        choices=("fifo", "asha"),
        default="fifo",
        help="asha: stop threshold-sweep trials whose teacher mAP trails their rung "
        "(one ratio and fold; with --baseline, needs --shared-burn-in)",
    )
    parser.add_argument(
        "--grace-steps",
        type=int,
        default=None,
        help="ASHA's first rung, in steps a trial trained (default: the preset's eval_every)",
    )
    parser.add_argument(
        "--reduction-factor", type=int, default=2, help="ASHA keeps 1/N of a rung's trials"
    )
    parser.add_argument("--experiment", default="fold_sweep", help="MLflow experiment name")
    parser.add_argument(
        "--name", default=None, help="sweep name (default: derived from the settings)"
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    preset_name, resources = default_preset_and_resources(
        args.preset,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_failures=args.max_failures,
    )
    overrides = tuple(args.overrides)
    return SweepSettings(
        preset=preset_name,
        ratios=args.ratios,
        folds=args.folds,
        methods=args.method,
        cls_thrs=args.cls_thrs,
        reg_thrs=args.reg_thrs,
        baseline=args.baseline,
        shared_burn_in=args.shared_burn_in,
        coco_root=str(args.coco_root.resolve()) if args.coco_root else None,
        results_dir=str(args.results_dir or SweepSettings.results_dir),
        data_dir=str(args.data_dir or SweepSettings.data_dir),
        on_bad_image=args.on_bad_image,
        resources=resources,
        max_steps=args.max_steps,
        ckpt_every=args.ckpt_every,
        seeds=seeds_of(args),
        overrides=overrides,
        experiment_name=args.experiment,
        sweep_name=args.name,
        early_stopping=_early_stopping(args, preset_name, overrides),
    )


def _early_stopping(
    args: argparse.Namespace, preset_name: str, overrides: tuple[str, ...]
) -> EarlyStopping | None:
    if args.scheduler != "asha":
        return None
    eval_every = (
        SweepSettings(preset=preset_name, overrides=overrides).base_config().train.eval_every
    )
    return EarlyStopping(args.grace_steps or eval_every, args.reduction_factor)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_usage_error(ValueError):  # the settings' and the config's own checks too
        settings = check_sweep(settings_from_args(args), args.address)
        port = None if joins_cluster(args.address) else choose_dashboard_port(args.dashboard_port)
    with exit_on_usage_error(ClusterAuthError):
        dashboard = start_or_join(args.address, args.num_cpus, port, args.dashboard_host)
    if joins_cluster(args.address) and (warning := placement_warning(settings.resources)):
        print(f"warning: {warning}", file=sys.stderr)
    if dashboard:
        print(f"Ray dashboard: {dashboard} (token: `ray get-auth-token`)")
    with exit_on_interrupt(), exit_on_usage_error(*INPUT_ERRORS):
        result = run_sweep(settings)
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
