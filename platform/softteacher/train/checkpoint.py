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
