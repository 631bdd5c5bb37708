"""What the platform costs around the step: the rows/s the Ray Data actors make
(``stream``), and the full loop in a single process without Ray, in the trial's process on
Ray Data, and under Ray Train (``platform``): steady speed apart from the fixed cost a run."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
from mlflow.tracking import MlflowClient

from softteacher.bench.prepare import BenchTable, fold_shards, synthetic_fold
from softteacher.config import ExperimentConfig
from softteacher.data.protocol import FoldData
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
IN_PROCESS = "in process (--workers 0), Ray Data"


def ray_train_loop(workers: int) -> str:
    """The table's name of the loop under Ray Train with ``workers`` workers."""
    return f"Ray Train, {workers} worker{'s' if workers > 1 else ''}, Ray Data"


def stream(data_dir: Path, rows_per_stream: int, preset_name: str) -> BenchTable:
    """Rows/s the Ray Data actors make for each stream at a preset's image sizes and
    augmentation, first-row latency apart."""
    cfg = preset(preset_name)
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


@dataclass(frozen=True, kw_only=True)
class PlatformOptions:
    """What ``platform`` runs: ``steps`` Soft Teacher steps of ``preset`` a loop, each loop
    at ``threads`` torch threads a worker (1 is a ``make sweep`` trial's, 2 the machine),
    the loops one after the other ``repeats`` times (this machine's speed drifts between
    runs more than the loops differ, so one run of each is no comparison). Ray Train runs
    with each of ``train_workers``: every worker takes a step's batch of its own rows (data
    parallel), so the images a step, and the loop's images/s, count all of them."""

    data_dir: Path
    steps: int = 60
    threads: int = 1
    repeats: int = 3
    preset: str = "cpu"
    train_workers: tuple[int, ...] = (1, 2)

    def ray_loops(self) -> dict[str, WorkerResources]:
        """Each loop on Ray by its name, with its workers (none: in process)."""
        workers = {IN_PROCESS: 0} | {ray_train_loop(n): n for n in self.train_workers}
        cpus = float(self.threads)
        return {k: WorkerResources(num_workers=n, cpus_per_worker=cpus) for k, n in workers.items()}


def platform(options: PlatformOptions) -> BenchTable:
    """The full Soft Teacher loop without Ray, in process and under Ray Train: steady
    images/s, wall and fixed cost a run, medians over the repeats."""
    cfg = preset(options.preset).replace(
        method={"burn_in_steps": 0, "unsup_weight_ramp_steps": 0},
        train={
            "max_steps": options.steps,
            "log_every": 10,
            "eval_every": 10**9,
            "ckpt_every": 10**9,
            "num_threads": options.threads,
        },
    )
    fold = synthetic_fold(cfg, options.data_dir)
    shards = fold_shards(fold, options.data_dir)
    ray_loops = options.ray_loops()
    measured: dict[str, list[tuple[float, float]]] = {SINGLE_PROCESS: []}
    measured |= {label: [] for label in ray_loops}
    with tempfile.TemporaryDirectory() as workdir:
        uri = f"sqlite:///{Path(workdir) / 'mlflow.db'}"
        for repeat in range(options.repeats):
            measured[SINGLE_PROCESS].append(_single_process(cfg, fold, options.data_dir))
            start_or_join()  # after the single process: no idle cluster beside it
            for label, resources in ray_loops.items():
                spec = RunSpec(
                    cfg,
                    fold,
                    *shards,
                    name=f"benchmark-{resources.num_workers}-{repeat}",
                    storage_path=str(Path(workdir) / "train"),
                    resources=resources,
                    tracking=start_parent_run(uri, "benchmark", f"{label} {repeat}", {}),
                )
                measured[label].append(_ray_loop(spec))
            ray.shutdown()
            latest = ", ".join(f"{label} {runs[-1][0]:.2f}" for label, runs in measured.items())
            print(f"repeat {repeat + 1} of {options.repeats}, images/s: {latest}", flush=True)
    images = options.steps * cfg.train.images_per_step  # a worker's
    trained = {SINGLE_PROCESS: images}
    trained |= {label: images * r.worker_count for label, r in ray_loops.items()}
    return _cost_table(measured, trained)


def _single_process(cfg: ExperimentConfig, fold: FoldData, data_dir: Path) -> tuple[float, float]:
    """The loop without Ray: (steady images/s, wall s)."""
    speeds: list[float] = []
    start = time.perf_counter()
    run_single_process(
        cfg,
        fold,
        shard_dir=data_dir / "shards",
        log=lambda step, m: speeds.append(m[IMAGES_PER_S]) if IMAGES_PER_S in m else None,
    )
    return _steady(speeds), time.perf_counter() - start


def _ray_loop(spec: RunSpec) -> tuple[float, float]:
    """The run of ``spec`` (in process or under Ray Train): (steady images/s of all its
    workers, from rank 0's in its MLflow run: the workers step together, wall s)."""
    start = time.perf_counter()
    run(spec)
    wall = time.perf_counter() - start
    history = MlflowClient(spec.tracking.tracking_uri).get_metric_history(
        spec.tracking.run_id, IMAGES_PER_S
    )
    per_worker = _steady([m.value for m in sorted(history, key=lambda m: m.step)])
    return spec.resources.worker_count * per_worker, wall


def _cost_table(
    measured: dict[str, list[tuple[float, float]]], images: dict[str, int]
) -> BenchTable:
    """Each loop's median steady images/s and fixed cost against the single process's,
    with the range over the repeats: the fixed cost is the wall time the steady speed
    does not account for (each loop trains ``images[loop]`` images)."""

    def fixed(label: str, run: tuple[float, float]) -> float:
        speed_, wall = run
        return wall - images[label] / speed_

    base_speed = statistics.median(speed_ for speed_, _ in measured[SINGLE_PROCESS])
    base_fixed = statistics.median(fixed(SINGLE_PROCESS, one) for one in measured[SINGLE_PROCESS])
    rows, records = [], []
    for label, runs in measured.items():
        speeds = [speed_ for speed_, _ in runs]
        fixes = [fixed(label, one) for one in runs]
        speed_, fixed_s = statistics.median(speeds), statistics.median(fixes)
        records.append(
            {
                "loop": label,
                "images_per_s": speed_,
                "images_per_s_all": speeds,
                "wall_s_all": [wall for _, wall in runs],
                "fixed_s": fixed_s,
                "fixed_s_all": fixes,
                "speed_ratio": speed_ / base_speed,
                "extra_fixed_s": fixed_s - base_fixed,
            }
        )
        rows.append(
            [
                label,
                f"{speed_:.2f} ({min(speeds):.2f}-{max(speeds):.2f})",
                f"{speed_ / base_speed:.2f}",
                f"{fixed_s:.1f} ({min(fixes):.1f}-{max(fixes):.1f})",
                f"{fixed_s - base_fixed:+.1f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "loop",
        "steady images/s, median (range)",
        "x single process",
        "fixed s, median (range)",
        "fixed s beyond single process",
    ]
    return header, rows, records
