"""The benchmark command end to end on the smoke preset: a teacher trained for it, the step
profile and the speed table, each written as Markdown and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from softteacher.names import STEP_PARTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def test_profile_and_speed_write_their_tables_from_a_trained_teacher(tmp_path):
    import benchmark

    common = ["--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data")]
    quick = ["--preset", "smoke", "--sizes", "64", "--teacher-steps", "4", "--warmup", "1"]
    benchmark.main([*common, "profile", *quick, "--steps", "2"])
    benchmark.main(
        [*common, "speed", *quick, "--steps", "1", "--repeats", "2", "--amp", "off,bf16"]
        + ["--kernels", "auto,reference"]
    )

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
        ("bf16", "auto", "supervised"),
        ("bf16", "auto", "soft_teacher_jitter"),
        ("bf16", "reference", "soft_teacher_jitter"),
    ]
    assert all(len(r["images_per_s_all"]) == 2 for r in speed["results"])
    assert all(r["images_per_s"] > 0 for r in speed["results"])
