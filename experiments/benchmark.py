"""The platform's benchmarks, one command: each prints its table and writes it as Markdown
and JSON under experiments/results/ (``benchmark_<name>.md`` / ``.json``).

    python experiments/benchmark.py speed      # supervised vs Soft Teacher steps, per detector
    python experiments/benchmark.py profile    # one Soft Teacher step broken into its parts
    python experiments/benchmark.py stream     # the Ray Data streams alone, 1 and 2 actors
    python experiments/benchmark.py platform   # the loop in process / under Ray Train vs no Ray
    python experiments/benchmark.py curve      # supervised mAP after a fixed number of steps

``speed`` and ``profile`` start from a trained teacher (``--init``, or one trained here once
and kept under data/bench/), so the Soft Teacher step jitters and scores real candidates.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import ray
import torch
from mlflow.tracking import MlflowClient

from softteacher.config import ExperimentConfig
from softteacher.data.protocol import FoldData, synthetic_folds
from softteacher.data.ray_stream import RayRowStream
from softteacher.data.rows import StreamPlan
from softteacher.data.shards import ShardSet, write_shards
from softteacher.names import IMAGES_PER_S, STUDENT_AP, TEACHER_AP
from softteacher.presets import preset
from softteacher.run.fit import run
from softteacher.run.local import local_step_batches, run_single_process
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.track.mlflow_runs import start_parent_run
from softteacher.track.render import markdown_table
from softteacher.train.checkpoint import has_checkpoint, load_weights
from softteacher.train.step_profile import profile_steps
from softteacher.train.trainer import SoftTeacherTrainer
from softteacher.tune.cluster import start_or_join

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1] / "data"
METHODS = ("supervised", "soft_teacher_jitter")
# The preset each detector comes from: the slim one from ``--preset`` (cpu, or smoke for a
# quick look), R50-FPN from the paper's.
R50_PRESET = "paper"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fold(cfg: ExperimentConfig, data: Path) -> FoldData:
    return synthetic_folds(data, cfg.synthetic, [10], [1])[0]


def _shards(fold: FoldData, data: Path) -> tuple[ShardSet, ShardSet]:
    labeled, unlabeled, _ = fold.load()
    return write_shards(labeled, data / "shards"), write_shards(unlabeled, data / "shards")


def _step_config(
    detector: str, size: int, method: str, slim_preset: str, amp: str = "off"
) -> ExperimentConfig:
    """A detector's preset at a fixed image size, past burn-in, at full unlabeled weight,
    on the slim preset's synthetic set."""
    source = preset(R50_PRESET if detector == "r50-fpn" else slim_preset)
    cfg = dataclasses.replace(source, synthetic=preset(slim_preset).synthetic)
    return cfg.replace(
        detector={"amp": amp},
        method={"method": method, "burn_in_steps": 0, "unsup_weight_ramp_steps": 0},
        augment={"train_sizes": (size, size), "test_size": size, "max_size": 2 * size},
    )


def trained_teacher(steps: int, slim_preset: str, data: Path) -> Path:
    """A slim supervised run's checkpoint (10% fold 1), trained once and kept; its folder
    names the detector's config, so a preset whose detector changed trains a new one."""
    cfg = preset(slim_preset)
    detector = json.dumps(dataclasses.asdict(cfg.detector), sort_keys=True).encode()
    key = hashlib.sha256(detector).hexdigest()[:8]
    directory = data / "bench" / f"teacher-{slim_preset}-{steps}-{key}"
    if has_checkpoint(directory):
        return directory
    cfg = cfg.replace(
        method={"method": "supervised"},
        train={"max_steps": steps, "eval_every": 10**9, "ckpt_every": steps, "log_every": 50},
    )
    print(f"training a teacher for the Soft Teacher step: {steps} supervised steps", flush=True)
    run_single_process(cfg, _fold(cfg, data), shard_dir=data / "shards", checkpoint_dir=directory)
    return directory


class PreparedSteps:
    """A trainer and a few step batches made before the clock starts, replayed in a cycle:
    what is timed is the step alone, not augmentation."""

    def __init__(
        self, cfg: ExperimentConfig, init: Path | None, data: Path, batches: int = 8
    ) -> None:
        device = _device()
        labeled, unlabeled = _shards(_fold(cfg, data), data)
        n_labeled, n_unlabeled = cfg.step_batch_sizes(cfg.method.burn_in_steps)
        source = local_step_batches(cfg, labeled, unlabeled if n_unlabeled else None, device)
        self.batches = [
            (source.labeled(n_labeled), source.unlabeled(n_unlabeled) if n_unlabeled else None)
            for _ in range(batches)
        ]
        self.images = n_labeled + n_unlabeled
        self.trainer = SoftTeacherTrainer(cfg, device)
        if init is not None and cfg.detector.preset == "slim":  # the teacher is a slim one
            load_weights(self.trainer, init)
        elif init is not None:
            print(f"{cfg.detector.preset}: from random init (the trained teacher is slim)")
        self.candidates: list[float] = []
        self._next = 0

    def step(self) -> None:
        labeled, unlabeled = self.batches[self._next % len(self.batches)]
        self._next += 1
        metrics = self.trainer.step(labeled, unlabeled)
        self.candidates.append(metrics.get("pseudo/candidates_per_image", 0.0))


def _teacher(args: argparse.Namespace) -> Path | None:
    """``--init``, else a teacher trained here once (none with ``--teacher-steps 0``)."""
    if args.init is not None or args.teacher_steps == 0:
        return args.init
    return trained_teacher(args.teacher_steps, args.preset, args.data_dir)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed(args: argparse.Namespace) -> tuple[list[str], list[list[str]], list[dict]]:
    """images/s of each method a step at equal images a step, median over repeats."""
    init = _teacher(args)
    header = [
        "detector",
        "short side",
        "amp",
        "method",
        "images/step",
        "images/s (median)",
        "range",
        "candidates/image",
        "RSS MiB",
        "CUDA max MiB",
    ]
    rows, records = [], []
    for detector in args.detectors.split(","):
        for size, amp, method in itertools.product(
            (int(s) for s in args.sizes.split(",")), args.amp.split(","), METHODS
        ):
            cfg = _step_config(detector, size, method, args.preset, amp)
            prepared = PreparedSteps(cfg, init, args.data_dir)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                prepared.step()
            speeds = []
            for _ in range(args.repeats):
                _sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    prepared.step()
                _sync()
                speeds.append(args.steps * prepared.images / (time.perf_counter() - start))
            timed = prepared.candidates[args.warmup :]
            record = {
                "detector": detector,
                "size": size,
                "amp": amp,
                "method": method,
                "images_per_step": prepared.images,
                "images_per_s": statistics.median(speeds),
                "images_per_s_all": speeds,
                "candidates_per_image": sum(timed) / len(timed),
                "rss_mib": psutil.Process().memory_info().rss / 2**20,
                "cuda_max_mib": (
                    torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
                ),
            }
            records.append(record)
            rows.append(
                [
                    detector,
                    str(size),
                    amp,
                    method,
                    str(prepared.images),
                    f"{record['images_per_s']:.2f}",
                    f"{min(speeds):.2f}-{max(speeds):.2f}",
                    f"{record['candidates_per_image']:.1f}",
                    f"{record['rss_mib']:.0f}",
                    "-" if record["cuda_max_mib"] is None else f"{record['cuda_max_mib']:.0f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return header, rows, records


def profile(args: argparse.Namespace) -> tuple[list[str], list[list[str]], list[dict]]:
    """One Soft Teacher step's parts and their shares; the operators that dominate."""
    init = _teacher(args)
    detector, size = args.detectors.split(",")[0], int(args.sizes.split(",")[0])
    cfg = _step_config(detector, size, METHODS[1], args.preset, args.amp.split(",")[0])
    prepared = PreparedSteps(cfg, init, args.data_dir)
    for _ in range(args.warmup):
        prepared.step()
    result = profile_steps(prepared.step, args.steps)
    candidates = sum(prepared.candidates[args.warmup :]) / args.steps
    print(f"{result.step_ms:.0f} ms a step, {candidates:.1f} teacher candidates an image")
    shares = result.shares()
    rows = [
        [name, f"{share * result.step_ms:.1f}", f"{share:.1%}"] for name, share in shares.items()
    ]
    rows += [
        [f"op: {name}", f"{ms:.1f}", f"{ms / result.step_ms:.1%}"] for name, ms in result.top_ops
    ]
    records = [
        {
            "step_ms": result.step_ms,
            "candidates_per_image": candidates,
            "part_ms": result.part_ms,
            "shares": shares,
            "top_ops": result.top_ops,
        }
    ]
    return ["part (own time)", "ms a step", "share of the step"], rows, records


def stream(args: argparse.Namespace) -> tuple[list[str], list[list[str]], list[dict]]:
    """Rows/s the Ray Data actors make for each stream, first-row latency apart."""
    cfg = preset("cpu")
    labeled, unlabeled = _shards(_fold(cfg, args.data_dir), args.data_dir)
    start_or_join(num_cpus=psutil.cpu_count())
    rows, records = [], []
    for kind, shards, views in (("labeled", labeled, 1), ("unlabeled", unlabeled, 2)):
        for actors in (1, 2):
            plan = StreamPlan(kind, shards.num_rows, seed=0)
            start = time.perf_counter()
            rows_stream = RayRowStream(
                shards, plan, cfg.augment, stop=args.rows + 16, concurrency=(actors, actors)
            )
            rows_stream.take(16)
            first = time.perf_counter() - start
            start = time.perf_counter()
            rows_stream.take(args.rows)
            rate = args.rows / (time.perf_counter() - start)
            records.append(
                {
                    "stream": kind,
                    "actors": actors,
                    "first_16_rows_s": first,
                    "rows_per_s": rate,
                    "images_per_s": rate * views,
                }
            )
            rows.append([kind, str(actors), f"{first:.1f}", f"{rate:.1f}", f"{rate * views:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    ray.shutdown()
    header = ["stream", "actors", "first 16 rows s", "rows/s", "images/s (views)"]
    return header, rows, records


def _steady(values: list[float]) -> float:
    """Median of the logged windows after the first (which holds start-up)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def platform(args: argparse.Namespace) -> tuple[list[str], list[list[str]], list[dict]]:
    """The full Soft Teacher loop three ways: steady images/s, wall and fixed cost a run."""
    cfg = preset("cpu").replace(
        method={"burn_in_steps": 0, "unsup_weight_ramp_steps": 0},
        train={"max_steps": args.steps, "log_every": 10, "eval_every": 10**9, "ckpt_every": 10**9},
    )
    fold = _fold(cfg, args.data_dir)
    speeds: list[float] = []
    start = time.perf_counter()
    run_single_process(
        cfg,
        fold,
        shard_dir=args.data_dir / "shards",
        log=lambda step, m: speeds.append(m[IMAGES_PER_S]) if IMAGES_PER_S in m else None,
    )
    measured = {"single process, no Ray": (_steady(speeds), time.perf_counter() - start)}
    labeled, unlabeled = _shards(fold, args.data_dir)
    start_or_join()
    with tempfile.TemporaryDirectory() as workdir:
        for label, workers in (
            ("in process (--workers 0), Ray Data", 0),
            ("Ray Train, 1 worker, Ray Data", 1),
        ):
            uri = f"sqlite:///{Path(workdir) / 'mlflow.db'}"
            tracking = start_parent_run(uri, "benchmark", label, {})
            spec = RunSpec(
                cfg,
                fold,
                labeled,
                unlabeled,
                name=f"benchmark-{workers}",
                storage_path=str(Path(workdir) / "train"),
                resources=WorkerResources(num_workers=workers, cpus_per_worker=2.0),
                tracking=tracking,
            )
            start = time.perf_counter()
            run(spec)
            wall = time.perf_counter() - start
            history = MlflowClient(uri).get_metric_history(tracking.run_id, IMAGES_PER_S)
            steady = _steady([m.value for m in sorted(history, key=lambda m: m.step)])
            measured[label] = (steady, wall)
    ray.shutdown()
    images = args.steps * cfg.train.images_per_step
    base_speed, base_wall = measured["single process, no Ray"]
    base_fixed = base_wall - images / base_speed
    rows, records = [], []
    for label, (speed_, wall) in measured.items():
        fixed = wall - images / speed_
        records.append(
            {
                "loop": label,
                "images_per_s": speed_,
                "wall_s": wall,
                "fixed_s": fixed,
                "speed_ratio": speed_ / base_speed,
                "extra_fixed_s": fixed - base_fixed,
            }
        )
        rows.append(
            [
                label,
                f"{speed_:.2f}",
                f"{speed_ / base_speed:.2f}",
                f"{wall:.1f}",
                f"{fixed:.1f}",
                f"{fixed - base_fixed:+.1f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "loop",
        "steady images/s",
        "x single process",
        "wall s",
        "fixed s",
        "fixed s beyond single process",
    ]
    return header, rows, records


def curve(args: argparse.Namespace) -> tuple[list[str], list[list[str]], list[dict]]:
    """Supervised mAP of the cpu preset after ``--steps`` steps, per labeled percent."""
    rows, records = [], []
    for percent in (float(p) for p in args.percents.split(",")):
        cfg = preset("cpu").replace(
            method={"method": "supervised"},
            train={
                "max_steps": args.steps,
                "eval_every": args.steps,
                "ckpt_every": args.steps,
                "log_every": 100,
                "max_val_images": None,
            },
        )
        fold = synthetic_folds(args.data_dir, cfg.synthetic, [percent], [1])[0]
        start = time.perf_counter()
        metrics = run_single_process(
            cfg,
            fold,
            shard_dir=args.data_dir / "shards",
            checkpoint_dir=args.data_dir / "bench" / f"curve-{percent:g}-{args.steps}",
        )
        minutes = (time.perf_counter() - start) / 60
        records.append({"percent": percent, "steps": args.steps, **metrics, "minutes": minutes})
        rows.append(
            [
                f"{percent:g}%",
                str(args.steps),
                f"{metrics[TEACHER_AP]:.1f}",
                f"{metrics[STUDENT_AP]:.1f}",
                f"{minutes:.1f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return ["labeled", "steps", "teacher mAP", "student mAP", "minutes"], rows, records


COMMANDS: dict[str, Callable] = {
    "speed": speed,
    "profile": profile,
    "stream": stream,
    "platform": platform,
    "curve": curve,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--data-dir", type=Path, default=DATA, help="synthetic sets, shards")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "profile"):
        step = sub.add_parser(name, help=COMMANDS[name].__doc__)
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
    sub.add_parser("stream", help=stream.__doc__).add_argument("--rows", type=int, default=320)
    sub.add_parser("platform", help=platform.__doc__).add_argument("--steps", type=int, default=60)
    curve_ = sub.add_parser("curve", help=curve.__doc__)
    curve_.add_argument("--percents", default="1,10,100")
    curve_.add_argument("--steps", type=int, default=600)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    header, rows, records = COMMANDS[args.command](args)
    where = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    context = (
        f"`python experiments/benchmark.py {args.command}` on {where}, "
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
