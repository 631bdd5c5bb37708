"""The in-process session: checkpoints persisted whole and pruned to the newest few, the
newest resumed, reports handed to callbacks; the in-process runner restarts a failed worker
as Ray Train would, and stops at once on an input error."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray.train
import torch

from softteacher.data.coco import ClassCountError
from softteacher.preflight import checkpoint_bytes
from softteacher.presets import preset
from softteacher.run import fit, worker
from softteacher.run.local import run_single_process
from softteacher.run.session import InProcessSession, RayTrainSession, checkpoints
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.run.worker import RunInputError, fatal_error_file
from softteacher.train.checkpoint import CHECKPOINT_FILE, SAVED_KEYS, CheckpointError


class _Recorder:
    def __init__(self) -> None:
        self.reports: list[dict] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.reports.extend(metrics)


def _checkpoint(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / f"staged-{step}"
    folder.mkdir()
    torch.save({key: step for key in SAVED_KEYS}, folder / CHECKPOINT_FILE)
    return folder


def test_checkpoints_are_kept_newest_first_and_the_newest_resumed(tmp_path):
    recorder = _Recorder()
    session = InProcessSession(tmp_path / "run", "exp", keep=2, callbacks=[recorder])
    with session.resume_dir() as directory:
        assert directory is None
    for step in (4, 8, 12):
        session.report({"step": step}, checkpoint_dir=_checkpoint(tmp_path, step))
    session.report({"step": 13, "loss/total": 0.5})
    kept = checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["checkpoint_000000008", "checkpoint_000000012"]
    with InProcessSession(tmp_path / "run", "exp", keep=2).resume_dir() as directory:
        assert torch.load(directory / CHECKPOINT_FILE)["step"] == 12
    assert [r["step"] for r in recorder.reports] == [4, 8, 12, 13]
    assert session.last_metrics == {"step": 13, "loss/total": 0.5}


def test_a_truncated_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys):
    run_dir = tmp_path / "run"
    session = InProcessSession(run_dir, "exp", keep=3)
    for step in (4, 8):
        session.report({"step": step}, checkpoint_dir=_checkpoint(tmp_path, step))
    newest = run_dir / "checkpoint_000000008" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:20])  # truncated on disk
    with session.resume_dir() as directory:
        assert directory.name == "checkpoint_000000004"
    warning = capsys.readouterr().err
    assert "skipping" in warning and "checkpoint_000000008" in warning


def test_a_truncated_ray_train_checkpoint_is_skipped_for_the_one_before(
    tmp_path, monkeypatch, capsys
):
    """A Ray Train worker resuming from Ray's latest checkpoint, truncated on disk: the
    one Ray saved before it, in the same run folder, resumes the run (named by time)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names = [f"checkpoint_2026-12-03_10-{minute:02d}-00.000001" for minute in (0, 5, 10)]
    for name, step in zip(names, (4, 8, 12), strict=True):
        _checkpoint(tmp_path, step).rename(run_dir / name)
    for name in names[1:]:  # the newest two truncated on disk
        _truncate(run_dir / name / CHECKPOINT_FILE)
    latest = ray.train.Checkpoint.from_directory(str(run_dir / names[-1]))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: latest)
    session = object.__new__(RayTrainSession)  # its resume, without a Train context
    with session.resume_dir() as directory:
        assert directory.name == names[0]
        assert torch.load(directory / CHECKPOINT_FILE)["step"] == 4
    warnings = capsys.readouterr().err
    assert warnings.count("warning: skipping") == 2 and names[-1] in warnings

    _truncate(run_dir / names[0] / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=names[-1]):  # none loads: the newest's error
        with session.resume_dir():
            pass


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:20])


def _spec(tmp_path: Path, smoke_fold, max_failures: int) -> RunSpec:
    return RunSpec(
        preset("smoke"),
        smoke_fold.fold,
        smoke_fold.labeled,
        smoke_fold.unlabeled,
        name="in-process",
        storage_path=str(tmp_path),
        resources=WorkerResources(num_workers=0, max_failures=max_failures),
    )


def test_a_failed_worker_restarts_and_an_input_error_stops_at_once(
    tmp_path, smoke_fold, monkeypatch
):
    calls: list[int] = []

    def flaky(spec, session):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the node went away")
        session.report({"step": 12, "teacher/AP": 5.0, "loss/total": 0.1})

    monkeypatch.setattr(fit, "train_recording_input_errors", flaky)
    result = fit.run(_spec(tmp_path, smoke_fold, max_failures=1))
    assert len(calls) == 2 and result.metrics == {"teacher/AP": 5.0}

    calls.clear()
    with pytest.raises(RuntimeError, match="the node went away"):
        fit.run(_spec(tmp_path, smoke_fold, max_failures=0))

    def bad_input(spec, session):
        calls.append(1)
        marker = fatal_error_file(spec)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("ValueError: image x.jpg is corrupt\n")
        raise ValueError("image x.jpg is corrupt")

    calls.clear()
    monkeypatch.setattr(fit, "train_recording_input_errors", bad_input)
    with pytest.raises(RunInputError, match="x.jpg is corrupt"):
        fit.run(_spec(tmp_path, smoke_fold, max_failures=2))
    assert len(calls) == 1  # no retry of an input error


def test_a_restarted_worker_stops_on_the_input_error_its_predecessor_left(
    tmp_path, smoke_fold, monkeypatch
):
    """What a Ray Train worker group restarted after an input error does: it fails at once
    with the recorded message and trains nothing."""
    spec = _spec(tmp_path, smoke_fold, max_failures=2)
    marker = fatal_error_file(spec)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("FileNotFoundError: train.init_from: no checkpoint in /x\n")
    trained: list[int] = []
    monkeypatch.setattr(worker, "_train", lambda spec, session: trained.append(1))
    session = InProcessSession(tmp_path / "run", "exp", keep=2)
    with pytest.raises(RunInputError, match="^FileNotFoundError: train.init_from: no checkpoint"):
        worker.train_recording_input_errors(spec, session)
    assert trained == []


def test_a_detector_too_small_for_the_dataset_stops_before_training(tmp_path, smoke_fold):
    """A run built without the sweep commands' checks (the library called directly), whose
    detector has fewer classes than the fold has categories: one line naming the file and
    the setting, before any stream starts, recorded so that no restart trains into it (before:
    torch's `IndexError: Target 3 is out of bounds` at the first loss, and the restarts)."""
    spec = _spec(tmp_path, smoke_fold, max_failures=2)
    cfg = spec.config
    small = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, num_classes=2))
    spec = dataclasses.replace(spec, config=small)
    session = InProcessSession(tmp_path / "run", "exp", keep=2)
    with pytest.raises(ClassCountError) as raised:
        worker.train_recording_input_errors(spec, session)
    assert str(raised.value) == (
        f"{smoke_fold.fold.val_ann}: 4 categories, and the detector has 2 classes; set "
        "detector.num_classes=4 (--set detector.num_classes=4)"
    )
    assert fatal_error_file(spec).read_text().startswith("ClassCountError: ")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing saved
    # the single-process runner (no Ray) says the same
    with pytest.raises(ClassCountError, match="the detector has 2 classes; set detector"):
        run_single_process(small, smoke_fold.fold, shard_dir=tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own (root only: skipped where mounting is not allowed, as on CI)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _resize(mount_point: Path, size: int) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(mount_point)], check=True, capture_output=True
    )


def test_a_disk_that_fills_mid_run_stops_it_at_once_and_a_rerun_resumes(
    ray_cluster, smoke_fold, small_disk, capsys
):
    """A results disk with room for one checkpoint: the second one fails, the run stops on
    one line naming the folder (not restarted: a retry would fail the same way), no half
    copy is left, and after space is freed the same run resumes from the first one."""
    cfg = preset("smoke").replace(
        method={"method": "supervised", "burn_in_steps": 100},
        train={"max_steps": 6, "ckpt_every": 3, "eval_every": 100, "log_every": 1},
    )
    _resize(small_disk, int(1.5 * checkpoint_bytes(cfg)))
    spec = dataclasses.replace(
        _spec(small_disk, smoke_fold, max_failures=2), config=cfg, unlabeled=None
    )
    with pytest.raises(RunInputError, match="^DiskFullError: .*no space left on its disk") as e:
        fit.run(spec)
    run_dir = small_disk / spec.name
    assert str(run_dir) in str(e.value) and "the checkpoint of step 6" in str(e.value)
    assert "restarting" not in capsys.readouterr().out
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no half copy
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint_000000003"]

    _resize(small_disk, int(3.5 * checkpoint_bytes(cfg)))
    result = fit.run(spec)
    assert "restarting" not in capsys.readouterr().out
    assert [p.name for p in checkpoints(run_dir)] == [
        "checkpoint_000000003",
        "checkpoint_000000006",
    ]
    assert "teacher/AP" in result.metrics
