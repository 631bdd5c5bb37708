"""Checkpoint files: student, teacher, optimiser, schedule, step and data position.

One format for the single-process runner and for Ray Train (which stores the same file in
its checkpoint directory), written atomically so a crash never leaves a torn file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from softteacher.files import atomic_open
from softteacher.train.trainer import SoftTeacherTrainer

CHECKPOINT_FILE = "checkpoint.pt"
# Where a run keeps its end-of-burn-in state, the branch point of ``train.branch_from``.
BRANCH_POINT_DIR = "branch_point"
# what every reader of a checkpoint takes from it (trainer.state_dict writes these)
SAVED_KEYS = ("student", "teacher", "optimizer", "scheduler", "step")


class CheckpointError(ValueError):
    """A checkpoint file that is unreadable, or whose weights do not fit the config."""


def save_checkpoint(
    trainer: SoftTeacherTrainer, directory: Path, extra: dict | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    state = trainer.state_dict() | {"extra": extra or {}}
    with atomic_open(target) as handle:
        torch.save(state, handle)
    return target


def read_checkpoint(directory: Path, map_location: torch.device | str = "cpu") -> dict:
    """The state saved in ``directory``, unpickled as tensors and plain data only
    (``weights_only``: loading a checkpoint never runs code from it); a missing, truncated or
    foreign file is one line naming it instead of torch's multi-line error."""
    file = Path(directory) / CHECKPOINT_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found; point at a checkpoint folder (one holding {CHECKPOINT_FILE}) of "
            "a finished or running run"
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise CheckpointError(
            f"{file}: holds {found.group(1) if found else 'objects'} beyond tensors and plain "
            "data, so it was not written by save_checkpoint; point at a checkpoint of this "
            "platform"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{file}: unreadable ({_first_sentence(error)}), the file is truncated or corrupt; "
            "delete its folder to resume from the checkpoint before it, or rerun the run"
        ) from None
    missing = [key for key in SAVED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{file}: lacks {missing}, so it was not written by save_checkpoint; point at a "
            "checkpoint of this platform"
        )
    return state


def load_checkpoint(trainer: SoftTeacherTrainer, directory: Path) -> dict:
    """Restore ``trainer`` from ``directory``; returns the ``extra`` dict saved with it."""
    state = _fitting_state(trainer, directory)
    trainer.load_state_dict(state)
    return state.get("extra", {})


def has_checkpoint(directory: Path | None) -> bool:
    return directory is not None and (directory / CHECKPOINT_FILE).is_file()


def load_weights(trainer: SoftTeacherTrainer, directory: Path) -> None:
    """Start a new run from another run's student and teacher (``train.init_from``): the
    optimiser, schedule and step start afresh, unlike a resume."""
    state = _fitting_state(trainer, directory)
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
    return int(read_checkpoint(_existing(directory, "checkpoint"))["step"])


def branch_point_dir(run_dir: Path) -> Path:
    """Where a run keeps its end-of-burn-in checkpoint, whether or not it has saved it yet."""
    return Path(run_dir) / BRANCH_POINT_DIR


def has_branch_point(run_dir: Path, step: int) -> bool:
    """Whether the run has saved its end-of-burn-in checkpoint (of ``step``) yet."""
    directory = branch_point_dir(run_dir)
    return has_checkpoint(directory) and checkpoint_step(directory) == step


def branch_point(run_dir: Path, step: int) -> Path:
    """The end-of-burn-in checkpoint a run keeps beside Ray's rolling ones (which Ray
    deletes past ``train.keep_checkpoints``): ``run_dir/branch_point``, saved at ``step``."""
    directory = branch_point_dir(run_dir)
    if has_branch_point(run_dir, step):
        return directory
    raise FileNotFoundError(
        f"no checkpoint of step {step} in {directory}; a run saves one at the end of "
        "burn-in (method.burn_in_steps): rerun its supervised trial to get one"
    )


def _existing(directory: Path, option: str) -> Path:
    if not has_checkpoint(directory):
        raise FileNotFoundError(
            f"{option}: no {CHECKPOINT_FILE} in {directory}; point it at a checkpoint folder "
            "of a finished or running run"
        )
    return directory


def _fitting_state(trainer: SoftTeacherTrainer, directory: Path) -> dict:
    """The checkpoint's state, checked to fit ``trainer``: the first key that does not is
    named with the class counts, the usual cause (torch's error lists every key, hundreds
    for another preset)."""
    state = read_checkpoint(directory, trainer.device)
    file = Path(directory) / CHECKPOINT_FILE
    saved = state.get("config", {}).get("detector", {}).get("num_classes")
    classes = f"detector.num_classes: {saved} there, {trainer.cfg.detector.num_classes} here"
    fix = "load it with the detector config of the run that wrote it"
    for which, model in (("student", trainer.student), ("teacher", trainer.teacher)):
        mismatch = _first_mismatch(model, state[which])
        if mismatch:
            raise CheckpointError(f"{file}: {which} {mismatch} ({classes}); {fix}")
    return state


def _first_mismatch(model: nn.Module, weights: dict) -> str | None:
    own = model.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    if missing or unexpected:
        return (
            f"weights do not fit this config's detector ({len(missing)} missing, first "
            f"{missing[:1]}; {len(unexpected)} unexpected, first {unexpected[:1]})"
        )
    for key, tensor in own.items():
        if weights[key].shape != tensor.shape:
            return (
                f"weight {key} is {list(weights[key].shape)} in the checkpoint but "
                f"{list(tensor.shape)} in this config's detector"
            )
    return None


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    return text.split(". ")[0].splitlines()[0][:120] if text else type(error).__name__
