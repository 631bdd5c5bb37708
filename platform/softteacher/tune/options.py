"""The command-line options every sweep command shares (``fold_sweep.py``, ``ablations.py``):
the preset and its overrides, the data, the workers of a trial and the cluster, declared
once so that the two commands spell and default them alike."""

from __future__ import annotations

import argparse
from pathlib import Path

from softteacher.presets import PRESETS
from softteacher.tune.cluster import DASHBOARD_HOST


class _AppendAmpOverride(argparse.Action):
    """``--amp X`` is ``--set detector.amp=X``: one place (the overrides) sets the config."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        namespace.overrides = [*namespace.overrides, f"detector.amp={value}"]


def _seed_list(text: str) -> tuple[int, ...]:
    seeds = tuple(int(v) for v in text.split(",") if v)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text}: a seed given twice would count twice")
    return seeds


def seeds_of(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--seeds``, or ``--seed`` as one seed; None: the preset's seed."""
    return args.seeds or ((args.seed,) if args.seed is not None else None)


def shared_options() -> argparse.ArgumentParser:
    """A parent parser (``argparse.ArgumentParser(parents=[shared_options()])``)."""
    parser = argparse.ArgumentParser(add_help=False)
    config = parser.add_argument_group("preset and data")
    config.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="smoke (tests), cpu (default without a GPU), bench (the 2-core benchmark of the "
        "method), paper (R50-FPN, COCO; default with a GPU)",
    )
    config.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="override the preset's schedule length (each stage of a multi-stage run)",
    )
    config.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set any config field after the preset and --max-steps (repeatable), e.g. "
        "--set method.unsup_weight=2 --set optim.decay_steps=1000,2000",
    )
    config.add_argument(
        "--amp",
        choices=("off", "bf16"),
        action=_AppendAmpOverride,
        help="mixed precision of the backbone and FPN (the same as --set detector.amp=bf16); "
        "for GPUs and for CPUs with AVX512-BF16 or AMX",
    )
    config.add_argument(
        "--coco-root",
        type=Path,
        default=None,
        help="a COCO 2017 layout (train2017/, val2017/, annotations/); default: synthetic",
    )
    config.add_argument("--results-dir", type=Path, default=None)
    config.add_argument("--data-dir", type=Path, default=None)
    config.add_argument(
        "--on-bad-image",
        choices=("skip", "fail"),
        default="skip",
        help="a training image that does not decode (every image is decoded once while the "
        "shards are made, before any trial trains): skip leaves it out with one warning and "
        "lists it in the shard set's skipped_images.json; fail stops before training. A bad "
        "val image always stops (default: skip)",
    )
    seeds = config.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=None, help="the runs' seed (default: the preset's, 0)"
    )
    seeds.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="replicates: every trial once a seed, e.g. 1,2,3; the tables then give the std "
        "over seeds (the run-to-run noise a difference must exceed)",
    )
    workers = parser.add_argument_group("workers and cluster")
    workers.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray Train workers per trial; 0: one worker in the trial's own process, the "
        "same loop, checkpoints and resume without a worker group's start-up (default: 0 "
        "on CPU, 1 with a GPU)",
    )
    workers.add_argument("--cpus-per-worker", type=float, default=None)
    workers.add_argument("--gpus-per-worker", type=float, default=None)
    workers.add_argument(
        "--max-failures", type=int, default=2, help="worker restarts from the last checkpoint"
    )
    workers.add_argument(
        "--address", default=None, help="join a running cluster ('auto'); default: start one"
    )
    workers.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of a local cluster"
    )
    workers.add_argument(
        "--dashboard-host",
        default=DASHBOARD_HOST,
        help="the address a local cluster's dashboard listens on (default: 127.0.0.1, this "
        "machine only; 0.0.0.0 exposes it, guarded by Ray's token authentication)",
    )
    workers.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        help="of a local cluster (default: 8265, or the next free port when another holds it)",
    )
    return parser
