"""Checkpoint files: a resume and a branch (``branch_from``) restore everything,
``init_from`` only the weights."""

import pytest
import torch

from softteacher.config import preset
from softteacher.train.checkpoint import (
    checkpoint_at_step,
    load_checkpoint,
    load_weights,
    restore_start,
    save_checkpoint,
)
from softteacher.train.trainer import SoftTeacherTrainer


def _trained(steps: int) -> SoftTeacherTrainer:
    trainer = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    with torch.no_grad():
        for param in trainer.student.parameters():
            param.add_(0.01)
    trainer.step_count = steps
    return trainer


def test_resume_restores_weights_step_and_extra(tmp_path):
    source = _trained(steps=7)
    save_checkpoint(source, tmp_path, {"data_position": {"labeled_epoch": 2}})
    target = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    extra = load_checkpoint(target, tmp_path)
    assert target.step_count == 7
    assert extra == {"data_position": {"labeled_epoch": 2}}
    for a, b in zip(source.student.parameters(), target.student.parameters()):
        torch.testing.assert_close(a, b)


def test_init_from_takes_the_weights_but_starts_the_schedule_afresh(tmp_path):
    source = _trained(steps=7)
    save_checkpoint(source, tmp_path)
    target = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    load_weights(target, tmp_path)
    assert target.step_count == 0
    assert not target.optimizer.state  # no momentum carried over
    for a, b in zip(source.student.parameters(), target.student.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(source.teacher.parameters(), target.teacher.parameters()):
        torch.testing.assert_close(a, b)


def _config_with(**train):
    return preset("smoke").replace(train=train)


def test_branch_from_continues_the_whole_state_of_the_other_run(tmp_path):
    source = _trained(steps=7)
    save_checkpoint(source, tmp_path, {"data_position": {"labeled_epoch": 3}})
    target = SoftTeacherTrainer(_config_with(branch_from=str(tmp_path)), torch.device("cpu"))
    extra = restore_start(target, resume_dir=None)
    assert target.step_count == 7  # the schedule goes on from the branch point
    assert extra == {"data_position": {"labeled_epoch": 3}}
    for a, b in zip(source.teacher.parameters(), target.teacher.parameters()):
        torch.testing.assert_close(a, b)


def test_a_run_s_own_checkpoint_wins_over_its_branch_point(tmp_path):
    save_checkpoint(_trained(steps=4), tmp_path / "branch")
    save_checkpoint(_trained(steps=9), tmp_path / "own")
    cfg = _config_with(branch_from=str(tmp_path / "branch"))
    target = SoftTeacherTrainer(cfg, torch.device("cpu"))
    restore_start(target, resume_dir=tmp_path / "own")
    assert target.step_count == 9


def test_restore_start_takes_init_from_weights_or_starts_fresh(tmp_path):
    save_checkpoint(_trained(steps=7), tmp_path)
    weights = SoftTeacherTrainer(_config_with(init_from=str(tmp_path)), torch.device("cpu"))
    assert restore_start(weights, resume_dir=None) == {} and weights.step_count == 0
    fresh = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    assert restore_start(fresh, resume_dir=tmp_path / "none") == {} and fresh.step_count == 0


def test_a_missing_branch_point_names_the_option_and_folder(tmp_path):
    target = SoftTeacherTrainer(_config_with(branch_from=str(tmp_path)), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="train.branch_from.*" + tmp_path.name):
        restore_start(target, resume_dir=None)


def test_init_from_and_branch_from_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        _config_with(init_from="a", branch_from="b")


def test_checkpoint_at_step_finds_the_folder_saved_at_that_step(tmp_path):
    save_checkpoint(_trained(steps=4), tmp_path / "checkpoint_2026-01-01_00-00-01")
    save_checkpoint(_trained(steps=8), tmp_path / "checkpoint_2026-01-01_00-00-02")
    (tmp_path / "checkpoint_2026-01-01_00-00-03").mkdir()  # torn: no file yet
    assert checkpoint_at_step(tmp_path, 8).name.endswith("00-02")
    assert checkpoint_at_step(tmp_path, 4).name.endswith("00-01")
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 6"):
        checkpoint_at_step(tmp_path, 6)
