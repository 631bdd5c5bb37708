"""Checkpoint files: a resume and a branch (``branch_from``) restore everything,
``init_from`` only the weights."""

import pytest
import torch

from softteacher.eval.inference import load_detector
from softteacher.presets import preset
from softteacher.train.checkpoint import (
    BRANCH_POINT_DIR,
    CHECKPOINT_FILE,
    CheckpointError,
    branch_point,
    checkpoint_step,
    load_checkpoint,
    load_weights,
    read_checkpoint,
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


def test_branch_point_is_the_kept_end_of_burn_in_checkpoint(tmp_path):
    save_checkpoint(_trained(steps=4), tmp_path / BRANCH_POINT_DIR)
    assert branch_point(tmp_path, 4) == tmp_path / BRANCH_POINT_DIR
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 6"):
        branch_point(tmp_path, 6)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 4"):
        branch_point(tmp_path / "elsewhere", 4)


def _one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


def test_what_is_saved_loads_as_weights_only_after_real_steps(tmp_path):
    """Optimiser momentum, the schedule, the config (tuples, None) and the extra dict are
    all tensors and plain data: torch.load(weights_only=True) takes them."""
    trainer = _trained(steps=3)
    for param in trainer.student.parameters():
        param.grad = torch.ones_like(param)
    trainer.optimizer.step()
    trainer.scheduler.step()
    save_checkpoint(trainer, tmp_path, {"data_position": {"labeled_epoch": 1}, "metrics": {}})
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["config"]["optim"]["decay_steps"] == trainer.cfg.optim.decay_steps
    assert state["optimizer"]["state"]  # momentum buffers came back
    target = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    load_checkpoint(target, tmp_path)
    assert target.scheduler.state_dict() == trainer.scheduler.state_dict()


def test_a_missing_checkpoint_file_names_it(tmp_path):
    target = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(target, tmp_path)
    _one_line(error, str(tmp_path / CHECKPOINT_FILE), "point at a checkpoint folder")


@pytest.mark.parametrize("keep", [0.5, 0.0, 10])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, keep):
    file = save_checkpoint(_trained(steps=2), tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    target = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    for read in (
        lambda: load_checkpoint(target, tmp_path),
        lambda: load_weights(target, tmp_path),
        lambda: checkpoint_step(tmp_path),
        lambda: load_detector(tmp_path, target.cfg),
    ):
        with pytest.raises(CheckpointError) as error:
            read()
        _one_line(error, str(file), "truncated or corrupt")


def test_a_file_that_is_not_our_checkpoint_is_refused_without_running_it(tmp_path):
    torch.save({"student": tmp_path}, tmp_path / CHECKPOINT_FILE)  # a pickled Path object
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    _one_line(error, str(tmp_path / CHECKPOINT_FILE), "not written by save_checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=r"lacks \['student', 'teacher'"):
        read_checkpoint(tmp_path)


def test_another_class_count_names_the_file_the_key_and_both_shapes(tmp_path):
    file = save_checkpoint(_trained(steps=2), tmp_path)  # smoke: 4 classes
    cfg = preset("smoke").replace(detector={"num_classes": 6})
    target = SoftTeacherTrainer(cfg, torch.device("cpu"))
    for load in (load_checkpoint, load_weights):
        with pytest.raises(CheckpointError) as error:
            load(target, tmp_path)
        _one_line(
            error, str(file), "student weight roi_heads.box_predictor.cls_score.weight",
            "is [5, 256] in the checkpoint but [7, 256]", "detector.num_classes: 4 there, 6 here",
        )


def test_weights_of_another_detector_are_one_line_too(tmp_path):
    file = save_checkpoint(_trained(steps=2), tmp_path)
    state = torch.load(file, weights_only=True)
    state["teacher"]["extra.weight"] = state["teacher"].pop("rpn.head.conv.0.0.weight")
    torch.save(state, file)
    with pytest.raises(CheckpointError) as error:
        load_weights(SoftTeacherTrainer(preset("smoke"), torch.device("cpu")), tmp_path)
    _one_line(
        error, "teacher weights do not fit this config's detector",
        "1 missing, first ['rpn.head.conv.0.0.weight']", "1 unexpected, first ['extra.weight']",
    )
