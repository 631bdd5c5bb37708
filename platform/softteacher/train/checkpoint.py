"""Checkpoint files: student, teacher, optimiser, schedule, step and data position.

One format for the single-process runner and for Ray Train (which stores the same file in
its checkpoint directory), written atomically so a crash never leaves a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from softteacher.train.trainer import SoftTeacherTrainer

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(
    trainer: SoftTeacherTrainer, directory: Path, extra: dict | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    state = trainer.state_dict() | {"extra": extra or {}}
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        torch.save(state, handle)
    os.replace(handle.name, target)
    return target


def load_checkpoint(trainer: SoftTeacherTrainer, directory: Path) -> dict:
    """Restore ``trainer`` from ``directory``; returns the ``extra`` dict saved with it."""
    state = torch.load(directory / CHECKPOINT_FILE, map_location=trainer.device, weights_only=False)
    trainer.load_state_dict(state)
    return state.get("extra", {})


def has_checkpoint(directory: Path | None) -> bool:
    return directory is not None and (directory / CHECKPOINT_FILE).is_file()


def load_weights(trainer: SoftTeacherTrainer, directory: Path) -> None:
    """Start a new run from another run's student and teacher (``train.init_from``): the
    optimiser, schedule and step start afresh, unlike a resume."""
    state = torch.load(directory / CHECKPOINT_FILE, map_location=trainer.device, weights_only=False)
    trainer.student.load_state_dict(state["student"])
    trainer.teacher.load_state_dict(state["teacher"])


def restore_start(trainer: SoftTeacherTrainer, resume_dir: Path | None) -> dict:
    """Where a run starts, for both runners: its own last checkpoint (a resume), else the
    run it branches off (``train.branch_from``: the whole state, so the schedule and the
    step go on), else another run's weights (``train.init_from``), else step 0. Returns the
    ``extra`` dict of the checkpoint the state came from ({} for a fresh start)."""
    train = trainer.cfg.train
    if has_checkpoint(resume_dir):
        return load_checkpoint(trainer, resume_dir)
    if train.branch_from:
        return load_checkpoint(trainer, _existing(Path(train.branch_from), "train.branch_from"))
    if train.init_from:
        load_weights(trainer, _existing(Path(train.init_from), "train.init_from"))
    return {}


def checkpoint_step(directory: Path) -> int:
    """The step a checkpoint folder was saved at."""
    state = torch.load(
        _existing(directory, "checkpoint") / CHECKPOINT_FILE, map_location="cpu", weights_only=False
    )
    return int(state["step"])


def checkpoint_at_step(run_dir: Path, step: int) -> Path:
    """The checkpoint folder of ``run_dir`` (a run's folder of ``checkpoint_*`` folders, as
    Ray Train writes them) saved at ``step``."""
    for directory in sorted(run_dir.glob("checkpoint_*")):
        if has_checkpoint(directory) and checkpoint_step(directory) == step:
            return directory
    raise FileNotFoundError(
        f"no checkpoint of step {step} under {run_dir}; the run saves one at the end of "
        "burn-in (method.burn_in_steps) and every train.ckpt_every steps: rerun it to get one"
    )


def _existing(directory: Path, option: str) -> Path:
    if not has_checkpoint(directory):
        raise FileNotFoundError(
            f"{option}: no {CHECKPOINT_FILE} in {directory}; point it at a checkpoint folder "
            "of a finished or running run"
        )
    return directory
