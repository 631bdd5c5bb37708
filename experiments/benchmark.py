"""The platform's benchmarks, one command: each prints its table and writes it as Markdown
and JSON under experiments/results/ (``benchmark_<name>.md`` / ``.json``).

    python experiments/benchmark.py speed      # supervised vs Soft Teacher steps, per detector
    python experiments/benchmark.py profile    # one Soft Teacher step broken into its parts
    python experiments/benchmark.py stream     # the Ray Data streams alone, 1 and 2 actors
    python experiments/benchmark.py platform   # the loop in process / under Ray Train vs no Ray
    python experiments/benchmark.py curve      # supervised mAP after a fixed number of steps

``speed`` and ``profile`` start from a trained teacher (``--init``, or one trained here once
and kept under data/bench/), so the Soft Teacher step jitters and scores real candidates.
The benchmarks themselves live in ``softteacher.bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from softteacher.bench.curve import curve
from softteacher.bench.prepare import BenchTable
from softteacher.bench.step import StepOptions, profile, speed
from softteacher.track.render import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1] / "data"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--data-dir", type=Path, default=DATA, help="synthetic sets, shards")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, benchmark in (("speed", speed), ("profile", profile)):
        step = sub.add_parser(name, help=benchmark.__doc__)
        step.add_argument("--detectors", default="slim", help="slim and/or r50-fpn")
        step.add_argument("--sizes", default="128", help="image short sides, e.g. 128,256")
        step.add_argument("--steps", type=int, default=10 if name == "speed" else 8)
        step.add_argument("--repeats", type=int, default=3)
        step.add_argument("--warmup", type=int, default=3)
        step.add_argument(
            "--init",
            type=Path,
            default=None,
            help="a trained run's checkpoint folder (default: train one)",
        )
        step.add_argument(
            "--teacher-steps", type=int, default=300, help="0: a random teacher (no candidates)"
        )
        step.add_argument("--preset", default="cpu", help="the slim detector's preset")
        step.add_argument(
            "--amp", default="off", help="backbone precisions to compare, e.g. off,bf16"
        )
        step.add_argument(
            "--kernels",
            default="auto",
            help="method.kernels to compare: auto (the Triton kernels on CUDA), reference",
        )
    stream_ = sub.add_parser("stream", help="the Ray Data streams' rows/s at 1 and 2 actors")
    stream_.add_argument("--rows", type=int, default=320)
    stream_.add_argument("--preset", default="cpu", help="whose sizes and augmentation")
    platform_ = sub.add_parser(
        "platform", help="the loop in process and under Ray Train against no Ray"
    )
    platform_.add_argument("--steps", type=int, default=60)
    platform_.add_argument(
        "--threads", type=int, default=1, help="torch threads a loop (1: a make-sweep trial's)"
    )
    platform_.add_argument("--repeats", type=int, default=3, help="each loop this many times")
    platform_.add_argument("--preset", default="cpu")
    platform_.add_argument(
        "--train-workers", default="1,2", help="Ray Train worker counts to time, e.g. 1,2"
    )
    curve_ = sub.add_parser("curve", help=curve.__doc__)
    curve_.add_argument("--percents", default="1,10,100")
    curve_.add_argument("--steps", type=int, default=600)
    return parser


def _step_options(args: argparse.Namespace) -> StepOptions:
    """Each ``StepOptions`` field from the option of its name; the lists split at commas."""
    lists = {
        "detectors": tuple(args.detectors.split(",")),
        "sizes": tuple(int(s) for s in args.sizes.split(",")),
        "amp": tuple(args.amp.split(",")),
        "kernels": tuple(args.kernels.split(",")),
    }
    fields = (f.name for f in dataclasses.fields(StepOptions) if f.name not in lists)
    return StepOptions(**lists, **{name: getattr(args, name) for name in fields})


def _measure(args: argparse.Namespace) -> BenchTable:
    """The parsed command onto its benchmark."""
    if args.command in ("speed", "profile"):
        options = _step_options(args)
        return speed(options) if args.command == "speed" else profile(options)
    # Ray and MLflow only for the two benchmarks that run on them: `speed` and `profile` run
    # where torch is all there is (the GPU check's machine, scripts/gpu_check.sh)
    from softteacher.bench.platform_cost import PlatformOptions, platform, stream

    if args.command == "stream":
        return stream(args.data_dir, args.rows, args.preset)
    if args.command == "platform":
        return platform(
            PlatformOptions(
                data_dir=args.data_dir,
                steps=args.steps,
                threads=args.threads,
                repeats=args.repeats,
                preset=args.preset,
                train_workers=tuple(int(n) for n in args.train_workers.split(",")),
            )
        )
    return curve(args.data_dir, tuple(float(p) for p in args.percents.split(",")), args.steps)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    header, rows, records = _measure(args)
    where = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    context = (
        f"`python experiments/benchmark.py {' '.join(argv)}` on {where}, "
        f"{torch.get_num_threads()} torch threads, {time.strftime('%Y-%m-%d')}."
    )
    table = markdown_table(header, rows)
    print(table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"benchmark_{args.command}"
    stem.with_suffix(".md").write_text(f"{context}\n\n{table}")
    payload = {
        "command": vars(args),  # paths written as text (default=str)
        "device": where,
        "results": records,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
