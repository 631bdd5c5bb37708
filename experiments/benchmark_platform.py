"""What the platform costs: the soft-teacher loop as a 1-worker Ray Train run and as an
in-process run (``--workers 0``: the trial's own process, Ray Data streams), against the
single-process loop without Ray; steady images/s and each one's fixed cost a run.

    python experiments/benchmark_platform.py --steps 60

Prints figures and writes experiments/results/platform_overhead.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from softteacher.config import ExperimentConfig
from softteacher.data.protocol import synthetic_folds
from softteacher.data.shards import write_shards
from softteacher.presets import preset
from softteacher.run.fit import run
from softteacher.run.local import run_single_process
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.track.mlflow_runs import start_parent_run
from softteacher.tune.cluster import start_or_join

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1] / "data"


def _config(steps: int) -> ExperimentConfig:
    return preset("cpu").replace(
        method={"burn_in_steps": 0, "unsup_weight_ramp_steps": 0},
        train={"max_steps": steps, "log_every": 10, "eval_every": 10**9, "ckpt_every": 10**9},
    )


def steady_images_per_s(values: list[float]) -> float:
    """Median of the logged windows after the first (which holds start-up)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def single_process(cfg: ExperimentConfig, fold) -> tuple[float, float]:
    speeds: list[float] = []
    start = time.perf_counter()
    run_single_process(
        cfg,
        fold,
        shard_dir=DATA / "shards",
        log=lambda step, m: speeds.append(m["images_per_s"]) if "images_per_s" in m else None,
    )
    return steady_images_per_s(speeds), time.perf_counter() - start


def under_ray(cfg: ExperimentConfig, fold, workdir: Path, num_workers: int) -> tuple[float, float]:
    labeled, unlabeled, _ = fold.load()
    labeled_shards = write_shards(labeled, DATA / "shards")
    unlabeled_shards = write_shards(unlabeled, DATA / "shards")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracking = start_parent_run(uri, "benchmark", "ray", {})
    spec = RunSpec(
        cfg,
        fold,
        labeled_shards,
        unlabeled_shards,
        name=f"benchmark-{num_workers}",
        storage_path=str(workdir / "train"),
        resources=WorkerResources(num_workers=num_workers, cpus_per_worker=2.0),
        tracking=tracking,
    )
    start = time.perf_counter()
    run(spec)
    wall = time.perf_counter() - start
    history = MlflowClient(uri).get_metric_history(tracking.run_id, "images_per_s")
    return steady_images_per_s([m.value for m in sorted(history, key=lambda m: m.step)]), wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cfg = _config(args.steps)
    fold = synthetic_folds(DATA, cfg.synthetic, [10], [1])[0]
    local_speed, local_wall = single_process(cfg, fold)
    start_or_join()
    with tempfile.TemporaryDirectory() as workdir:
        in_process = under_ray(cfg, fold, Path(workdir), num_workers=0)
        train = under_ray(cfg, fold, Path(workdir), num_workers=1)
    ray.shutdown()
    images = args.steps * cfg.train.images_per_step
    local_fixed = local_wall - images / local_speed
    lines = [
        "| loop | steady images/s | wall s | fixed cost s (wall - images / speed) |",
        "|---|---|---|---|",
        f"| single process, no Ray | {local_speed:.2f} | {local_wall:.1f} | {local_fixed:.1f} |",
    ]
    ratios = []
    for label, (speed, wall) in (
        ("in process (--workers 0), Ray Data", in_process),
        ("Ray Train, 1 worker, Ray Data", train),
    ):
        fixed = wall - images / speed
        lines.append(f"| {label} | {speed:.2f} | {wall:.1f} | {fixed:.1f} |")
        ratios.append(
            f"{label}: {speed / local_speed:.2f} of the single process's images/s, "
            f"{fixed - local_fixed:+.1f} s of fixed cost"
        )
    lines += ["", *(f"- {line}" for line in ratios)]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "platform_overhead.md"
    out.write_text(
        f"Soft Teacher (full method) on the cpu preset, {args.steps} steps of 1 labeled + 4 "
        "unlabeled images at ~128 px, 2 torch threads, one evaluation at the end (in the "
        "fixed cost).\n\n" + text + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
