"""Checkpoint files: a resume restores everything, ``init_from`` only the weights."""

import torch

from softteacher.config import preset
from softteacher.train.checkpoint import load_checkpoint, load_weights, save_checkpoint
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
