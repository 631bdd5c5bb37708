"""The sweep's data, made once by the driver before any trial: each (ratio, fold)'s files,
its Parquet shards, and the image lists a trial logs to MLflow as its dataset inputs. Every
image is decoded once here (the val images too), so a bad one stops the sweep or is left
out before any trial trains, not hours into one."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from softteacher.data.image_check import check_val_images
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


# Under the data dir: one marker a val set whose images all decode at their annotated size.
VAL_CHECKS = "val_checks"


def prepare_folds(settings: SweepSettings) -> dict[str, PreparedFold]:
    """Fold files and their shards (both cached by content) for every (ratio, fold).

    The val set's images are checked first (once a content: a marker under the data dir):
    a bad or mis-sized val image is a :class:`CorruptImageError`, never skipped, as leaving
    it out would change the benchmark. A bad training image follows
    ``settings.on_bad_image`` (:func:`write_shards`).
    """
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
        val_digest = _file_digest(fold.val_ann)
        check_val_images(val, data_dir / VAL_CHECKS, val_digest)
        policy = settings.on_bad_image
        labeled_shards = write_shards(labeled, data_dir / "shards", on_bad_image=policy)
        unlabeled_shards = write_shards(unlabeled, data_dir / "shards", on_bad_image=policy)
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
            DataSplit("val", val_digest, fold.val_ann, len(val.records), "evaluation"),
        )
        prepared[fold_key(fold.percent, fold.fold)] = PreparedFold(
            fold, labeled_shards, unlabeled_shards, splits
        )
        skipped = labeled_shards.num_skipped + unlabeled_shards.num_skipped
        print(
            f"fold {fold.fold}@{fold.percent:g}%: {labeled_shards.num_rows} labeled, "
            f"{unlabeled_shards.num_rows} unlabeled images"
            + (f" ({skipped} left out: they do not decode)" if skipped else "")
        )
    return prepared


def _file_digest(path: Path) -> str:
    """Ten hex digits of the file's SHA-256: the same content, the same digest."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
