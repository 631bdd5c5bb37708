"""The multi-stage baseline's offline pseudo-labeling, without Ray: which boxes it keeps, the
merged training file it writes, and a supervised run that trains on that file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from softteacher.config import MethodConfig
from softteacher.data.coco import load_coco
from softteacher.data.protocol import synthetic_folds
from softteacher.presets import preset
from softteacher.run.local import run_single_process
from softteacher.run.offline_labels import (
    PseudoLabelError,
    pseudo_label_offline,
    teacher_from_checkpoint,
)
from softteacher.train.checkpoint import save_checkpoint
from softteacher.train.trainer import SoftTeacherTrainer

UNLABELED_IMAGES = 12  # of the fold's 54: labeling speed on 2 busy cores is the test's cost


@pytest.fixture(scope="module")
def fold_sets(tmp_path_factory):
    fold = synthetic_folds(tmp_path_factory.mktemp("data"), preset("smoke").synthetic, [10], [1])[0]
    labeled, unlabeled, _ = fold.load()
    unlabeled = dataclasses.replace(unlabeled, records=unlabeled.records[:UNLABELED_IMAGES])
    return fold, labeled, unlabeled


def _teacher(bias: float, weight_std: float = 0.0) -> torch.nn.Module:
    """The smoke detector's teacher with an ROI head that calls every box class 1 and
    regresses nothing. Class 1 scores ~softmax(bias) over 5 classes (bias 12: ~1.0, bias 2:
    ~0.65), and ``weight_std`` > 0 spreads them from box to box."""
    trainer = SoftTeacherTrainer(preset("smoke"), torch.device("cpu"))
    predictor = trainer.teacher.roi_heads.box_predictor
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = predictor.cls_score.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * weight_std)
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[1] = bias
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    return trainer.teacher


def _pseudo_annotations(path, unlabeled) -> list[dict]:
    ids = set(unlabeled.image_ids)
    return [a for a in json.loads(path.read_text())["annotations"] if a["image_id"] in ids]


def test_kept_boxes_pass_the_threshold_and_a_higher_one_keeps_fewer(fold_sets, tmp_path):
    fold, labeled, unlabeled = fold_sets
    teacher = _teacher(bias=2.0, weight_std=0.05)  # scores spread around 0.6-0.7
    cfg = preset("smoke").augment
    kept = {}
    for cls_thr in (0.6, 0.7):
        out = tmp_path / f"merged-{cls_thr}.json"
        report = pseudo_label_offline(teacher, unlabeled, cfg, cls_thr, out, labeled=labeled)
        pseudo = _pseudo_annotations(out, unlabeled)
        assert len(pseudo) == report.boxes_kept > 0
        assert all(a["score"] > cls_thr for a in pseudo)
        assert all(a["iscrowd"] == 0 and a["bbox"][2] >= 1 and a["bbox"][3] >= 1 for a in pseudo)
        assert {a["category_id"] for a in pseudo} <= set(labeled.cat_id_to_label)
        assert len({a["id"] for a in json.loads(out.read_text())["annotations"]}) == (
            sum(len(r.boxes) for r in labeled.records) + report.boxes_kept
        )  # annotation ids stay unique across the merged file
        assert report.images == UNLABELED_IMAGES
        assert report.metrics()["multi_stage/pseudo_boxes_per_image"] == pytest.approx(
            report.boxes_kept / UNLABELED_IMAGES
        )
        kept[cls_thr] = report
    # a partial filter: the higher threshold drops some of what the lower one kept
    assert 0 < kept[0.7].boxes_kept < kept[0.6].boxes_kept
    assert kept[0.7].boxes_dropped > kept[0.6].boxes_dropped
    assert (kept[0.6].boxes_kept + kept[0.6].boxes_dropped + kept[0.6].boxes_too_small) == (
        kept[0.7].boxes_kept + kept[0.7].boxes_dropped + kept[0.7].boxes_too_small
    )


def test_merged_file_holds_both_sets_and_a_supervised_run_trains_on_it(fold_sets, tmp_path):
    fold, labeled, unlabeled = fold_sets
    out = tmp_path / "merged.json"
    report = pseudo_label_offline(
        _teacher(bias=12.0), unlabeled, preset("smoke").augment, 0.9, out, labeled=labeled
    )
    assert report.images_with_boxes == UNLABELED_IMAGES

    merged = load_coco(out, fold.train_images)
    assert merged.image_ids == labeled.image_ids + unlabeled.image_ids
    assert merged.categories == labeled.categories
    by_id = {r.image_id: r for r in merged.records}
    for record in labeled.records:  # the labeled fold passes through unchanged
        assert torch.equal(torch.from_numpy(by_id[record.image_id].boxes),
                           torch.from_numpy(record.boxes))
    assert sum(len(by_id[i].boxes) for i in unlabeled.image_ids) == report.boxes_kept

    cfg = preset("smoke").replace(
        method={"method": "supervised"}, train={"max_steps": 3, "log_every": 1}
    )
    logged: list[int] = []
    final = run_single_process(
        cfg,
        dataclasses.replace(fold, labeled_ann=out),
        shard_dir=tmp_path / "shards",
        log=lambda step, metrics: logged.append(step),
        device=torch.device("cpu"),
    )
    assert 3 in logged and "teacher/AP" in final and "student/AP75" in final


def test_overlapping_labeled_and_unlabeled_sets_are_refused(fold_sets, tmp_path):
    _, labeled, unlabeled = fold_sets
    clash = dataclasses.replace(unlabeled, records=unlabeled.records + labeled.records[:1])
    with pytest.raises(PseudoLabelError, match="shares image ids"):
        pseudo_label_offline(
            _teacher(bias=12.0), clash, preset("smoke").augment, 0.9, tmp_path / "x.json",
            labeled=labeled,
        )
    assert not (tmp_path / "x.json").exists()


def test_teacher_from_checkpoint_is_the_runs_ema_teacher(tmp_path):
    cfg = preset("smoke")
    trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
    with torch.no_grad():
        next(trainer.teacher.parameters()).add_(1.0)  # teacher != student
    save_checkpoint(trainer, tmp_path)
    teacher = teacher_from_checkpoint(cfg, tmp_path, torch.device("cpu"))
    assert not teacher.training
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="must finish with a checkpoint"):
        teacher_from_checkpoint(cfg, tmp_path / "missing", torch.device("cpu"))


def test_multi_stage_steps_are_supervised_and_read_no_unlabeled_images():
    method = MethodConfig(method="multi_stage")
    assert not method.uses_unlabeled and not method.uses_jitter and method.uses_ema
    assert method.effective_indicator == "none"
    cfg = preset("smoke").replace(method={"method": "multi_stage"})
    assert cfg.step_batch_sizes(0) == (cfg.train.images_per_step, 0)
