"""The multi-stage baseline's offline step (paper Table 5, "Multi-Stage"; STAC-like).

Multi-stage training is: (1) train supervised on the labeled fold, (2) pseudo-label the
unlabeled set once with that run's teacher, keeping boxes whose score is above the
foreground threshold, (3) train supervised again on labeled + pseudo-labeled images. This
module is step (2), free of Ray: it writes one COCO file that holds the labeled fold as it
is and the unlabeled images with their pseudo boxes, which the ordinary data path (shards,
streams) then trains on like any labeled file. The Ray side (tune/sweep.py) runs the stages.

The teacher sees each image once, on the deterministic test view (``resize_for_test``), and
its boxes are scaled back to the original pixels, as ``eval.coco_eval.predict`` does for
evaluation; the labels are hard (the score is kept in the file for inspection only).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from softteacher.config import AugmentConfig, ExperimentConfig
from softteacher.data.coco import CocoDataset, check_same_categories, read_coco_json
from softteacher.data.protocol import FoldData
from softteacher.eval.coco_eval import predict
from softteacher.files import write_atomically
from softteacher.model.pseudo_labels import MIN_PSEUDO_BOX_SIDE
from softteacher.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from softteacher.train.trainer import SoftTeacherTrainer

# Images a ``predict`` call: bounds the detections held at once (COCO's unlabeled set has
# ~100k images of up to 100 detections each), not a speed setting.
LABELING_CHUNK_IMAGES = 256


class PseudoLabelError(ValueError):
    """Inputs the offline pseudo-labeling cannot combine into one training file."""


@dataclass(frozen=True)
class PseudoLabelReport:
    """What the offline pass kept: ``boxes_dropped`` scored at or below ``cls_thr``,
    ``boxes_too_small`` passed it but have a side under ``MIN_PSEUDO_BOX_SIDE`` pixels."""

    out_file: Path
    cls_thr: float
    images: int
    images_with_boxes: int
    boxes_kept: int
    boxes_dropped: int
    boxes_too_small: int
    labeled_images: int

    @property
    def boxes_per_image(self) -> float:
        return self.boxes_kept / max(self.images, 1)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics of the pass (keys under ``multi_stage/``)."""
        return {
            "multi_stage/pseudo_boxes_per_image": self.boxes_per_image,
            "multi_stage/pseudo_boxes_kept": float(self.boxes_kept),
            "multi_stage/pseudo_boxes_dropped": float(self.boxes_dropped),
            "multi_stage/pseudo_boxes_too_small": float(self.boxes_too_small),
            "multi_stage/unlabeled_images": float(self.images),
            "multi_stage/images_with_pseudo_boxes": float(self.images_with_boxes),
            "multi_stage/labeled_images": float(self.labeled_images),
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "out_file": str(self.out_file),
            "boxes_per_image": self.boxes_per_image,
        }


def pseudo_label_offline(
    model: torch.nn.Module,
    unlabeled: CocoDataset,
    augment_cfg: AugmentConfig,
    cls_thr: float,
    out_file: Path,
    *,
    labeled: CocoDataset,
) -> PseudoLabelReport:
    """Detect on every unlabeled image once, keep boxes with score > ``cls_thr``, and write
    ``out_file``: the labeled fold file unchanged plus the unlabeled images, each with its
    pseudo boxes as annotations (``iscrowd`` 0, ``score`` kept). Replaced atomically."""
    check_same_categories(labeled, unlabeled)
    labeled_content = read_coco_json(labeled.ann_file)
    _check_disjoint(labeled, unlabeled)
    next_id = 1 + max((int(a.get("id", 0)) for a in labeled_content["annotations"]), default=0)
    pseudo: list[dict] = []
    dropped = too_small = 0
    for start in range(0, len(unlabeled.records), LABELING_CHUNK_IMAGES):
        chunk = dataclasses.replace(
            unlabeled, records=unlabeled.records[start : start + LABELING_CHUNK_IMAGES]
        )
        for detection in predict(model, chunk, augment_cfg):
            if detection["score"] <= cls_thr:
                dropped += 1
                continue
            width, height = detection["bbox"][2:]
            if min(width, height) < MIN_PSEUDO_BOX_SIDE:
                too_small += 1
                continue
            pseudo.append(_pseudo_annotation(detection, next_id + len(pseudo)))
    images = [
        {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height}
        for r in unlabeled.records
    ]
    merged = labeled_content | {
        "images": labeled_content["images"] + images,
        "annotations": labeled_content["annotations"] + pseudo,
    }
    write_atomically(Path(out_file), json.dumps(merged, separators=(",", ":")))
    return PseudoLabelReport(
        out_file=Path(out_file),
        cls_thr=float(cls_thr),
        images=len(images),
        images_with_boxes=len({a["image_id"] for a in pseudo}),
        boxes_kept=len(pseudo),
        boxes_dropped=dropped,
        boxes_too_small=too_small,
        labeled_images=len(labeled_content["images"]),
    )


def teacher_from_checkpoint(
    cfg: ExperimentConfig, checkpoint_dir: Path, device: torch.device
) -> torch.nn.Module:
    """The EMA teacher of a finished run (the model a supervised run reports), in eval mode."""
    if not (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(
            f"{Path(checkpoint_dir) / CHECKPOINT_FILE} not found; the first (supervised) stage "
            "must finish with a checkpoint before the unlabeled set can be pseudo-labeled"
        )
    trainer = SoftTeacherTrainer(cfg, device)
    load_checkpoint(trainer, Path(checkpoint_dir))
    return trainer.teacher.eval()


def label_fold_from_checkpoint(
    cfg: ExperimentConfig,
    fold: FoldData,
    checkpoint_dir: Path,
    cls_thr: float,
    out_file: Path,
    device: torch.device | None = None,
) -> PseudoLabelReport:
    """Step (2) for one fold: the finished stage-1 run's teacher labels the fold's unlabeled
    set, and ``out_file`` becomes the fold's labeled + pseudo-labeled training file."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labeled, unlabeled, _ = fold.load()
    teacher = teacher_from_checkpoint(cfg, checkpoint_dir, device)
    return pseudo_label_offline(teacher, unlabeled, cfg.augment, cls_thr, out_file, labeled=labeled)


def _check_disjoint(labeled: CocoDataset, unlabeled: CocoDataset) -> None:
    shared = set(labeled.image_ids) & set(unlabeled.image_ids)
    if shared:
        raise PseudoLabelError(
            f"{unlabeled.ann_file} shares image ids {sorted(shared)[:5]} with "
            f"{labeled.ann_file}; use the labeled and unlabeled files of one fold "
            "(experiments/prepare_folds.py)"
        )


def _pseudo_annotation(detection: dict, annotation_id: int) -> dict:
    x, y, width, height = detection["bbox"]
    return {
        "id": annotation_id,
        "image_id": detection["image_id"],
        "category_id": detection["category_id"],
        "bbox": [x, y, width, height],
        "area": width * height,
        "iscrowd": 0,
        "score": detection["score"],
    }
