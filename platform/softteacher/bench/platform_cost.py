"""What the platform costs around the step: the rows/s the Ray Data actors make
(``stream``), and the full loop in a single process without Ray, in the trial's process on
Ray Data, and under Ray Train (``platform``): steady speed apart from the fixed cost a run."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import psutil
import ray
from mlflow.tracking import MlflowClient

from softteacher.bench.prepare import BenchTable, fold_shards, synthetic_fold
from softteacher.data.ray_stream import RayRowStream
from softteacher.data.rows import StreamPlan
from softteacher.names import IMAGES_PER_S
from softteacher.presets import preset
from softteacher.run.fit import run
from softteacher.run.local import run_single_process
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.track.mlflow_runs import start_parent_run
from softteacher.tune.cluster import start_or_join

SINGLE_PROCESS = "single process, no Ray"


def stream(data_dir: Path, rows_per_stream: int) -> BenchTable:
    """Rows/s the Ray Data actors make for each stream, first-row latency apart."""
    cfg = preset("cpu")
    labeled, unlabeled = fold_shards(synthetic_fold(cfg, data_dir), data_dir)
    start_or_join(num_cpus=psutil.cpu_count())
    rows, records = [], []
    for kind, shards, views in (("labeled", labeled, 1), ("unlabeled", unlabeled, 2)):
        for actors in (1, 2):
            plan = StreamPlan(kind, shards.num_rows, seed=0)
            start = time.perf_counter()
            rows_stream = RayRowStream(  # every row from the actors: they are what is timed
                shards,
                plan,
                cfg.augment,
                stop=rows_per_stream + 16,
                concurrency=(actors, actors),
                head_rows=0,
            )
            rows_stream.take(16)
            first = time.perf_counter() - start
            start = time.perf_counter()
            rows_stream.take(rows_per_stream)
            rate = rows_per_stream / (time.perf_counter() - start)
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


def platform(data_dir: Path, steps: int) -> BenchTable:
    """The full Soft Teacher loop three ways: steady images/s, wall and fixed cost a run."""
    cfg = preset("cpu").replace(
        method={"burn_in_steps": 0, "unsup_weight_ramp_steps": 0},
        train={"max_steps": steps, "log_every": 10, "eval_every": 10**9, "ckpt_every": 10**9},
    )
    fold = synthetic_fold(cfg, data_dir)
    speeds: list[float] = []
    start = time.perf_counter()
    run_single_process(
        cfg,
        fold,
        shard_dir=data_dir / "shards",
        log=lambda step, m: speeds.append(m[IMAGES_PER_S]) if IMAGES_PER_S in m else None,
    )
    measured = {SINGLE_PROCESS: (_steady(speeds), time.perf_counter() - start)}
    labeled, unlabeled = fold_shards(fold, data_dir)
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
    return _cost_table(measured, steps * cfg.train.images_per_step)


def _cost_table(measured: dict[str, tuple[float, float]], images: int) -> BenchTable:
    """Each loop's (steady images/s, wall s) against the single process: the fixed cost is
    the wall time the steady speed does not account for."""
    base_speed, base_wall = measured[SINGLE_PROCESS]
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
