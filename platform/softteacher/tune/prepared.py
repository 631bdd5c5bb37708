"""The sweep's data, made once by the driver before any trial: each (ratio, fold)'s files,
its Parquet shards, and the image lists a trial logs to MLflow as its dataset inputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from softteacher.data.protocol import FoldData, coco_folds, synthetic_folds
from softteacher.data.shards import ShardSet, write_shards
from softteacher.track.datasets import DataSplit
from softteacher.tune.grid import SweepSettings


@dataclass(frozen=True)
class PreparedFold:
    """A fold's files, its shards, and its labeled / unlabeled / val image lists."""

    data: FoldData
    labeled: ShardSet
    unlabeled: ShardSet
    splits: tuple[DataSplit, ...]


def fold_key(ratio: float, fold: int) -> str:
    return f"{fold}@{ratio:g}"


def prepare_folds(settings: SweepSettings) -> dict[str, PreparedFold]:
    """Fold files and their shards (both cached by content) for every (ratio, fold)."""
    data_dir = Path(settings.data_dir)
    if settings.coco_root:
        folds = coco_folds(
            Path(settings.coco_root), data_dir / "coco_folds", settings.ratios, settings.folds
        )
    else:
        folds = synthetic_folds(
            data_dir, settings.base_config().synthetic, settings.ratios, settings.folds
        )
    prepared = {}
    for fold in folds:
        labeled, unlabeled, val = fold.load()
        labeled_shards = write_shards(labeled, data_dir / "shards")
        unlabeled_shards = write_shards(unlabeled, data_dir / "shards")
        name = f"{fold.percent:g}% fold {fold.fold}"
        splits = (
            DataSplit(
                f"{name} labeled",
                labeled_shards.key,
                fold.labeled_ann,
                labeled_shards.num_rows,
                "training",
            ),
            DataSplit(
                f"{name} unlabeled",
                unlabeled_shards.key,
                fold.unlabeled_ann,
                unlabeled_shards.num_rows,
                "unlabeled",
            ),
            DataSplit(
                "val", _file_digest(fold.val_ann), fold.val_ann, len(val.records), "evaluation"
            ),
        )
        prepared[fold_key(fold.percent, fold.fold)] = PreparedFold(
            fold, labeled_shards, unlabeled_shards, splits
        )
        print(
            f"fold {fold.fold}@{fold.percent:g}%: {len(labeled.records)} labeled, "
            f"{len(unlabeled.records)} unlabeled images"
        )
    return prepared


def _file_digest(path: Path) -> str:
    """Ten hex digits of the file's SHA-256: the same content, the same digest."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
