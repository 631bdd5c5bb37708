"""The benchmark command end to end on the smoke preset: a teacher trained for it, the step
profile and the speed table, each written as Markdown and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from softteacher.names import STEP_PARTS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

# What a GPU image may lack (scripts/gpu_check.sh runs `speed` on one with torch and Triton
# alone): the command runs here in a Python that cannot import them.
WITHOUT_RAY_MLFLOW_PYCOCOTOOLS = textwrap.dedent("""
    import runpy, sys

    class Missing:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("ray", "mlflow", "pycocotools"):
                raise ModuleNotFoundError(f"no module named {name!r} here", name=name)

    sys.meta_path.insert(0, Missing())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.slow
def test_profile_and_speed_write_their_tables_from_a_trained_teacher(tmp_path):
    import benchmark

    common = ["--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data")]
    quick = ["--preset", "smoke", "--sizes", "64", "--teacher-steps", "4", "--warmup", "1"]
    speed = [*common, "speed", *quick, "--steps", "1", "--repeats", "2"]
    # the teacher trained and the steps timed without Ray, MLflow or pycocotools; bf16 left
    # out: emulated on CPUs without AVX512-BF16, its rows took 2.8x these
    subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_MLFLOW_PYCOCOTOOLS, str(EXPERIMENTS / "benchmark.py"),
         *speed, "--kernels", "auto,reference"],
        check=True,
    )  # fmt: skip
    benchmark.main([*common, "profile", *quick, "--steps", "2"])

    assert len(list((tmp_path / "data" / "bench").glob("teacher-smoke-4-*"))) == 1  # kept
    profile = json.loads((tmp_path / "results" / "benchmark_profile.json").read_text())
    (record,) = profile["results"]
    assert set(record["part_ms"]) == set(STEP_PARTS)
    assert sum(record["shares"].values()) == pytest.approx(1.0)
    assert "| step/box_jitter |" in (tmp_path / "results" / "benchmark_profile.md").read_text()
    speed = json.loads((tmp_path / "results" / "benchmark_speed.json").read_text())
    measured = [(r["amp"], r["kernels"], r["method"]) for r in speed["results"]]
    assert measured == [  # the supervised step uses no kernel: timed once
        ("off", "auto", "supervised"),
        ("off", "auto", "soft_teacher_jitter"),
        ("off", "reference", "soft_teacher_jitter"),
    ]
    assert all(len(r["images_per_s_all"]) == 2 for r in speed["results"])
    assert all(r["images_per_s"] > 0 for r in speed["results"])


def test_the_stream_benchmark_augments_at_the_presets_sizes_with_one_then_two_actors(
    tmp_path, monkeypatch
):
    """What ``stream --preset`` hands each pool (the pools themselves are Ray Data's, timed
    by the command, not here)."""
    from softteacher.bench import platform_cost
    from softteacher.presets import preset

    made = []

    class Pool:
        def __init__(self, shards, plan, augment, **options) -> None:
            made.append((plan.stream, augment, options["concurrency"]))

        def take(self, rows: int) -> None:
            pass

    monkeypatch.setattr(platform_cost, "RayRowStream", Pool)
    monkeypatch.setattr(platform_cost, "start_or_join", lambda **options: None)
    monkeypatch.setattr(platform_cost.ray, "shutdown", lambda: None)
    _, _, records = platform_cost.stream(tmp_path, 8, "smoke")

    assert [(stream, actors) for stream, _, actors in made] == [
        ("labeled", (1, 1)), ("labeled", (2, 2)), ("unlabeled", (1, 1)), ("unlabeled", (2, 2))
    ]  # fmt: skip
    assert all(augment == preset("smoke").augment for _, augment, _ in made)
    assert preset("smoke").augment != preset("cpu").augment  # so the preset is the one used
    assert [r["images_per_s"] / r["rows_per_s"] for r in records] == [1, 1, 2, 2]


def test_speed_times_each_precision_and_kernel_choice_and_the_supervised_step_once():
    from softteacher.bench.step import StepOptions, speed_cases

    options = StepOptions(
        data_dir=Path("unused"), detectors=("slim", "r50-fpn"), sizes=(64,), amp=("off", "bf16"),
        kernels=("auto", "reference"), steps=1, repeats=1, warmup=0, init=None,
        teacher_steps=0, preset="smoke",
    )
    cases = speed_cases(options)

    assert [(d, amp, k, m) for d, _, amp, k, m in cases[:6]] == [
        ("slim", "off", "auto", "supervised"),
        ("slim", "off", "auto", "soft_teacher_jitter"),
        ("slim", "off", "reference", "soft_teacher_jitter"),
        ("slim", "bf16", "auto", "supervised"),
        ("slim", "bf16", "auto", "soft_teacher_jitter"),
        ("slim", "bf16", "reference", "soft_teacher_jitter"),
    ]
    assert cases[6:] == [("r50-fpn", *case[1:]) for case in cases[:6]]


@pytest.mark.slow
def test_platform_times_the_three_loops_and_writes_their_table(tmp_path, monkeypatch):
    """On the cluster the benchmark starts (as a sweep does), the Ray Train loop runs
    without the preemption watcher, which has nothing to watch on a cluster of one's own."""
    import benchmark
    import ray
    from ray.util.state import list_actors

    from softteacher.bench.platform_cost import IN_PROCESS, SINGLE_PROCESS, ray_train_loop

    if ray.is_initialized():  # the tests' shared cluster: this test needs a sweep's own
        ray.shutdown()
    shutdown = ray.shutdown
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # kept up to list its actors
    try:
        benchmark.main(
            ["--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data")]
            + ["platform", "--preset", "smoke", "--steps", "3", "--repeats", "1"]
            + ["--threads", "1", "--train-workers", "1"]  # two: test_the_loops_on_ray_...
        )
        address = ray.get_runtime_context().gcs_address  # not the other test process's
        started = {a.class_name for a in list_actors(address=address, limit=10_000)}
    finally:
        shutdown()

    assert "TrainController" in started and "PreemptionWatcher" not in started
    payload = json.loads((tmp_path / "results" / "benchmark_platform.json").read_text())
    results = payload["results"]
    assert [r["loop"] for r in results] == [SINGLE_PROCESS, IN_PROCESS, ray_train_loop(1)]
    assert all(r["images_per_s"] > 0 and len(r["wall_s_all"]) == 1 for r in results)
    assert payload["command"]["threads"] == 1


def test_the_loops_on_ray_are_in_process_then_each_worker_count_at_the_threads_asked():
    from softteacher.bench.platform_cost import IN_PROCESS, PlatformOptions, ray_train_loop

    loops = PlatformOptions(data_dir=Path("unused"), threads=2, train_workers=(1, 2)).ray_loops()

    assert list(loops) == [IN_PROCESS, ray_train_loop(1), ray_train_loop(2)]
    assert [r.num_workers for r in loops.values()] == [0, 1, 2]
    assert [r.worker_count for r in loops.values()] == [1, 1, 2]  # what the images count
    assert {r.cpus_per_worker for r in loops.values()} == {2.0}
    assert ray_train_loop(2) == "Ray Train, 2 workers, Ray Data"


def test_the_cost_table_takes_medians_over_repeats_against_the_single_process():
    from softteacher.bench.platform_cost import (
        IN_PROCESS,
        SINGLE_PROCESS,
        _cost_table,
        ray_train_loop,
    )

    one, two = ray_train_loop(1), ray_train_loop(2)
    measured = {  # a loop at 10 images/s and 15 s of wall spends 5 s outside the steps
        SINGLE_PROCESS: [(10.0, 15.0), (10.0, 14.0), (10.0, 16.0)],
        IN_PROCESS: [(9.0, 30.0), (8.0, 20.0), (10.0, 40.0)],  # median 9/s, fixed ~18.9 s
        one: [(5.0, 50.0), (5.0, 50.0), (5.0, 50.0)],
        two: [(16.0, 40.0), (16.0, 40.0), (16.0, 40.0)],  # 200 images: 12.5 s of steps
    }
    images = {SINGLE_PROCESS: 100, IN_PROCESS: 100, one: 100, two: 200}
    _, rows, records = _cost_table(measured, images)

    by_loop = {r["loop"]: r for r in records}
    assert by_loop[SINGLE_PROCESS]["fixed_s"] == pytest.approx(5.0)
    assert by_loop[IN_PROCESS]["speed_ratio"] == pytest.approx(0.9)
    assert by_loop[IN_PROCESS]["fixed_s"] == pytest.approx(30.0 - 100 / 9)
    assert by_loop[IN_PROCESS]["fixed_s_all"] == pytest.approx([30 - 100 / 9, 7.5, 30.0])
    assert by_loop[one]["extra_fixed_s"] == pytest.approx(25.0)
    assert by_loop[two]["speed_ratio"] == pytest.approx(1.6)
    assert by_loop[two]["fixed_s"] == pytest.approx(27.5)
    assert rows[1][1] == "9.00 (8.00-10.00)"
