"""Where a run's worker loop reports to and resumes from: a Ray Train worker, or the
calling process itself.

The loop (``run/worker.py``) is one function for both. Under ``TorchTrainer`` Ray Train
persists the checkpoints and restarts the workers. In process, ``InProcessSession`` does
the same on the same storage folder: checkpoints ``checkpoint_<step>`` beside the branch
point, the newest ``keep`` of them kept, the run resumed from the newest, each report
handed to the run's callbacks as Ray Train's controller would. Ray Train's own local mode
keeps checkpoints only in memory and calls no callback, so it cannot resume a run or feed a
Tune trial; a single-worker trial run in process keeps every feature and saves the 26 s a
trial that starting Ray Train's controller, helper actors and worker group costs on 2 cores
(29 s beyond a run without Ray, against 3.5 s in process: README, "Platform overhead").
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch

from softteacher.names import STEP
from softteacher.train.checkpoint import (
    BRANCH_POINT_DIR,
    CheckpointError,
    has_checkpoint,
    read_checkpoint,
)

CHECKPOINT_PREFIX = "checkpoint_"


class RunSession(Protocol):
    """What the loop needs from whoever runs it."""

    rank: int
    world_size: int
    experiment_name: str
    device: torch.device

    def resume_dir(self) -> Any:
        """A context manager giving the folder of the checkpoint to resume from, or None."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        """Hand out the metrics (and persist the checkpoint folder, if given)."""
        ...


class RayTrainSession:
    """Inside a ``TorchTrainer`` worker: Ray Train's context, checkpoints and reports."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.experiment_name = context.get_experiment_name()
        self.device = ray.train.torch.get_device()

    @contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        """Ray's latest checkpoint, or, when that one is truncated or corrupt, the newest
        readable one before it in the same run folder (on local or shared storage, where
        Ray's checkpoint folder is the stored one itself)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield readable_or_earlier(Path(directory))

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)


class InProcessSession:
    """One worker in the calling process, checkpointing under ``run_dir`` itself."""

    def __init__(
        self,
        run_dir: Path,
        experiment_name: str,
        keep: int,
        callbacks: list | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.experiment_name = experiment_name
        self.device = device or torch.device("cpu")
        self.run_dir = Path(run_dir)
        self._keep = keep
        self._callbacks = callbacks or []
        self.last_metrics: dict[str, float] = {}

    @contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        yield readable_checkpoint(self.run_dir)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        if checkpoint_dir is not None:
            self._persist(checkpoint_dir, int(metrics[STEP]))
        self.last_metrics = dict(metrics)
        for callback in self._callbacks:  # as Ray Train's controller calls them
            callback.after_report(None, [dict(metrics)], None)

    def _persist(self, source: Path, step: int) -> None:
        """Copy in atomically (a crash leaves no half checkpoint), then drop the oldest."""
        target = self.run_dir / f"{CHECKPOINT_PREFIX}{step:09d}"
        staging = self.run_dir / f".{target.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(source, staging)
        except BaseException:  # a full disk: leave no half copy taking up its space
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)  # a resumed run saving the same step again
        staging.rename(target)
        for old in checkpoints(self.run_dir)[: -self._keep]:
            shutil.rmtree(old, ignore_errors=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """An in-process run's checkpoints, oldest first (the branch point is not one of them)."""
    if not run_dir.is_dir():
        return []
    found = [
        path
        for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if path.name != BRANCH_POINT_DIR and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(path for path in found if has_checkpoint(path))


def readable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that loads: one truncated on disk (a full disk, a killed copy)
    is skipped with a warning naming it, and the one before it resumes the run."""
    latest = latest_checkpoint(run_dir)
    return None if latest is None else readable_or_earlier(latest)


def readable_or_earlier(directory: Path) -> Path:
    """``directory`` if its checkpoint loads; else, with a warning naming it, the newest
    readable checkpoint folder saved before it beside it (Ray names them by time, in
    process by step: both sort by name). Raises the first error when none loads."""
    try:
        read_checkpoint(directory)
        return directory
    except CheckpointError as error:
        print(f"warning: skipping {directory}: {error}", file=sys.stderr, flush=True)
        first_error = error
    earlier = sorted(
        path
        for path in directory.parent.glob(f"{CHECKPOINT_PREFIX}*")
        if path.name < directory.name and has_checkpoint(path)
    )
    for path in reversed(earlier):
        try:
            read_checkpoint(path)
        except CheckpointError as error:
            print(f"warning: skipping {path}: {error}", file=sys.stderr, flush=True)
            continue
        return path
    raise first_error


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def node_id() -> str | None:
    """The Ray node this process runs on (None outside a Ray cluster)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
