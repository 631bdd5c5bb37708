"""The STAC protocol's inputs for one run: a fold's labeled, unlabeled and val files.

Either the embedded synthetic set (generated once, cached by its config) or a real COCO
layout (``train2017/``, ``val2017/``, ``annotations/``); the folds are made here in both cases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from softteacher.config import SyntheticConfig
from softteacher.data.coco import (
    CocoDataset,
    CocoSummary,
    check_same_categories,
    coco_summary,
    load_coco,
)
from softteacher.data.folds import write_folds
from softteacher.data.synthetic import ensure_synthetic_coco

# The official COCO 2017 layout, as a --coco-root must hold it.
COCO_TRAIN_IMAGES = "train2017"
COCO_VAL_IMAGES = "val2017"
COCO_TRAIN_ANN = "annotations/instances_train2017.json"
COCO_VAL_ANN = "annotations/instances_val2017.json"


class DatasetLayoutError(FileNotFoundError):
    """A COCO root that lacks the files the protocol needs."""


@dataclass(frozen=True)
class FoldData:
    """The files of one (percent, fold): what a trial needs to find its data on any node."""

    percent: float
    fold: int
    labeled_ann: Path
    unlabeled_ann: Path
    val_ann: Path
    train_images: Path
    val_images: Path

    def load(self) -> tuple[CocoDataset, CocoDataset, CocoDataset]:
        """Labeled, unlabeled and val sets, validated; the class lists must agree."""
        labeled = load_coco(self.labeled_ann, self.train_images)
        unlabeled = load_coco(self.unlabeled_ann, self.train_images)
        val = load_coco(self.val_ann, self.val_images)
        check_same_categories(labeled, unlabeled)
        check_same_categories(labeled, val)
        return labeled, unlabeled, val


def synthetic_folds(
    data_root: Path, cfg: SyntheticConfig, percents: Iterable[float], folds: Iterable[int]
) -> list[FoldData]:
    """The embedded default: the synthetic set for ``cfg`` (reused when it exists) and its folds."""
    identity = json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
    key = hashlib.sha256(identity).hexdigest()[:10]
    dataset = ensure_synthetic_coco(Path(data_root) / f"synthetic-{key}", cfg)
    return _folds_of(
        dataset.train_ann, dataset.root / "folds", percents, folds,
        dataset.val_ann, dataset.train_images, dataset.val_images,
    )


def check_coco_layout(coco_root: Path) -> None:
    """Fail naming every part of the COCO 2017 layout that ``coco_root`` lacks."""
    root = Path(coco_root)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"--coco-root {root}: no such folder; give the folder that holds {COCO_TRAIN_IMAGES}/"
            f", {COCO_VAL_IMAGES}/ and annotations/ (the official COCO 2017 layout)"
        )
    missing = [f"{name}/" for name in (COCO_TRAIN_IMAGES, COCO_VAL_IMAGES)
               if not (root / name).is_dir()]
    missing += [name for name in (COCO_TRAIN_ANN, COCO_VAL_ANN) if not (root / name).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"--coco-root {root} lacks {', '.join(missing)}; it must hold the official COCO "
            f"2017 layout ({COCO_TRAIN_IMAGES}/, {COCO_VAL_IMAGES}/, {COCO_TRAIN_ANN}, "
            f"{COCO_VAL_ANN})"
        )


def coco_root_summary(coco_root: Path) -> CocoSummary:
    """The train file's image count and categories, checked to be the val file's: the
    detector's class count comes from it (a mismatch would score every class wrongly)."""
    check_coco_layout(coco_root)
    train = coco_summary(Path(coco_root) / COCO_TRAIN_ANN)
    check_same_categories(train, coco_summary(Path(coco_root) / COCO_VAL_ANN))
    return train


def coco_folds(
    coco_root: Path, fold_dir: Path, percents: Iterable[float], folds: Iterable[int]
) -> list[FoldData]:
    """Folds of a real COCO 2017 layout, written under ``fold_dir``."""
    root = Path(coco_root)
    check_coco_layout(root)
    return _folds_of(
        root / COCO_TRAIN_ANN, Path(fold_dir), percents, folds, root / COCO_VAL_ANN,
        root / COCO_TRAIN_IMAGES, root / COCO_VAL_IMAGES,
    )


def _folds_of(
    train_ann: Path,
    fold_dir: Path,
    percents: Iterable[float],
    folds: Iterable[int],
    val_ann: Path,
    train_images: Path,
    val_images: Path,
) -> list[FoldData]:
    files = write_folds(train_ann, fold_dir, percents, folds)
    return [
        FoldData(f.percent, f.fold, f.labeled, f.unlabeled, val_ann, train_images, val_images)
        for f in files
    ]
