"""A shared burn-in's branch waiting in the sweep's one Tune experiment for its supervised
trial's branch point, and a restored trial finding the parent run of the command now
running (tune/trial.py), against real MLflow stores on disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softteacher.track.mlflow_runs import (
    RunRef,
    find_or_start_child_run,
    finish_run,
    start_parent_run,
)
from softteacher.train.checkpoint import CHECKPOINT_FILE, SAVED_KEYS, branch_point_dir
from softteacher.tune.trial import (
    BranchPointError,
    TrialJob,
    current_parent,
    wait_for_branch_point,
    write_parent,
)

BURN_IN = 4


@pytest.fixture
def parent(tmp_path: Path) -> RunRef:
    return start_parent_run(f"sqlite:///{tmp_path}/mlflow.db", "fold_sweep", "sweep", {})


def _later(action: Callable[[], None], delay_s: float = 0.5) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), action()))
    thread.start()
    return thread


def _save_branch_point(run_dir: Path, step: int) -> None:
    directory = branch_point_dir(run_dir)
    directory.mkdir(parents=True)
    state = {key: {} for key in SAVED_KEYS} | {"step": step}
    torch.save(state, directory / CHECKPOINT_FILE)


def test_a_branch_starts_once_its_supervised_trial_saved_the_branch_point(parent, tmp_path):
    root = find_or_start_child_run(parent, "r10-f1-supervised", {})
    # a previous sweep's failed run of the same trial, which this sweep is training again
    finish_run(root, "FAILED")
    find_or_start_child_run(parent, "r10-f1-supervised", {})
    saver = _later(lambda: _save_branch_point(tmp_path / "run", BURN_IN))
    started = time.monotonic()
    wait_for_branch_point(parent, "r10-f1-supervised", tmp_path / "run", BURN_IN, poll_s=0.05)
    saver.join()
    assert time.monotonic() - started >= 0.5


def test_a_checkpoint_of_another_step_is_not_the_branch_point(parent, tmp_path):
    root = find_or_start_child_run(parent, "r10-f1-supervised", {})
    _save_branch_point(tmp_path / "run", BURN_IN + 1)
    ender = _later(lambda: finish_run(root))
    with pytest.raises(BranchPointError, match="ended FINISHED without that checkpoint"):
        wait_for_branch_point(parent, "r10-f1-supervised", tmp_path / "run", BURN_IN, poll_s=0.05)
    ender.join()


def test_a_branch_fails_once_its_supervised_trial_ended_without_the_branch_point(parent, tmp_path):
    root = find_or_start_child_run(parent, "r10-f1-supervised", {})
    ender = _later(lambda: finish_run(root, "FAILED"))
    with pytest.raises(BranchPointError) as error:
        wait_for_branch_point(parent, "r10-f1-supervised", tmp_path / "run", BURN_IN, poll_s=0.05)
    ender.join()
    message = str(error.value)
    assert "r10-f1-supervised at step 4" in message and "ended FAILED" in message
    assert "rerun the same command" in message


def test_a_restored_trial_logs_under_the_parent_of_the_command_now_running(parent, tmp_path):
    """Tune restores an unfinished trial with the job it was made with; when the rerun logs
    to a new MLflow store, the trial takes the parent run the driver names now."""
    parent_file = tmp_path / "ray" / "sweep.mlflow_parent.json"
    job = TrialJob(None, None, parent, "smoke", str(tmp_path), parent_file=str(parent_file))
    assert current_parent(job) == parent  # no file: a job made by this command
    (tmp_path / "new").mkdir()
    new_store = start_parent_run(f"sqlite:///{tmp_path}/new/mlflow.db", "fold_sweep", "sweep", {})
    write_parent(parent_file, new_store)
    assert current_parent(job) == new_store
    child = find_or_start_child_run(current_parent(job), "r10-f1-supervised", {})
    assert child.tracking_uri == new_store.tracking_uri
