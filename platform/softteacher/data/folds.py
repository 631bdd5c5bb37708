"""The STAC data protocol: labeled / unlabeled folds of a COCO training file.

A fold labels exactly ``max(1, int(percent / 100 * n_images))`` images, drawn per image
without replacement, and is rebuilt from ``(fold, percent)`` alone: every image id gets a
keyed hash (BLAKE2b keyed by ``"{fold}@{percent:g}"``) and the smallest hashes are labeled.
That depends on neither the order of the input nor numpy's sampling algorithms, so the
same fold comes out on any machine and any library version. (The original protocol used
an unrecorded random offset, and MMDetection 3 sampled with replacement.)

The unlabeled file keeps its annotations so that pseudo-label quality can be measured;
the trainer never reads them.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from softteacher.data.coco import CocoFormatError, read_coco_json
from softteacher.files import write_atomically

DEFAULT_STEM = "instances_train2017"


class FoldError(ValueError):
    """A fold request that cannot be met (bad percent or fold, no images, repeated ids)."""


@dataclass(frozen=True)
class FoldFiles:
    """The two files of one fold, their sizes, and which of them this call (re)wrote."""

    fold: int
    percent: float
    labeled: Path
    unlabeled: Path
    num_labeled: int
    num_unlabeled: int
    labeled_annotations: int
    unlabeled_annotations: int
    written: tuple[Path, ...]


def labeled_count(num_images: int, percent: float) -> int:
    """How many images a ``percent`` fold labels: ``int(percent / 100 * n)``, at least 1."""
    return max(1, int(percent / 100 * num_images))


def fold_paths(
    out_dir: Path, percent: float, fold: int, *, stem: str = DEFAULT_STEM
) -> tuple[Path, Path]:
    """``{stem}.{fold}@{percent:g}.json`` and ``{stem}.{fold}@{percent:g}-unlabeled.json``."""
    tag = f"{fold}@{percent:g}"
    out_dir = Path(out_dir)
    return out_dir / f"{stem}.{tag}.json", out_dir / f"{stem}.{tag}-unlabeled.json"


def split_fold(image_ids: Sequence[int], percent: float, fold: int) -> tuple[list[int], list[int]]:
    """Labeled and unlabeled image ids (each sorted) of fold ``fold`` at ``percent``."""
    _check_request(percent, fold)
    ids = sorted(image_ids)
    if not ids:
        raise FoldError("cannot split an empty image list; the annotation file has no images")
    if len(set(ids)) != len(ids):
        raise FoldError("image ids repeat; give each image its own id before splitting")
    key = f"{fold}@{percent:g}".encode()
    ranked = sorted(ids, key=lambda image_id: (_rank(key, image_id), image_id))
    labeled = set(ranked[: labeled_count(len(ids), percent)])
    return (
        [i for i in ids if i in labeled],
        [i for i in ids if i not in labeled],
    )


def write_fold(
    ann_file: Path, out_dir: Path, percent: float, fold: int, *, stem: str = DEFAULT_STEM
) -> FoldFiles:
    """Write one fold's labeled and unlabeled files (see ``write_folds``)."""
    return write_folds(ann_file, out_dir, [percent], [fold], stem=stem)[0]


def write_folds(
    ann_file: Path,
    out_dir: Path,
    percents: Iterable[float],
    folds: Iterable[int],
    *,
    stem: str = DEFAULT_STEM,
) -> list[FoldFiles]:
    """Write every (percent, fold) pair from one read of ``ann_file``.

    Each image's JSON and its annotations' JSON are encoded once and joined per file, so
    COCO train2017 takes seconds a fold rather than a full re-encode each. A file that
    already holds the same bytes is left alone (so its mtime and any cache keyed on it stay
    valid); others are replaced atomically.
    """
    percents, folds = list(percents), list(folds)
    for percent in percents:
        for fold in folds:
            _check_request(percent, fold)
    source = _EncodedCoco.read(Path(ann_file))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for percent in percents:
        for fold in folds:
            labeled_ids, _ = split_fold(source.image_ids, percent, fold)
            labeled_set = set(labeled_ids)
            is_labeled = [image_id in labeled_set for image_id in source.image_ids]
            labeled_path, unlabeled_path = fold_paths(out_dir, percent, fold, stem=stem)
            written = []
            counts = []
            for path, keep in ((labeled_path, True), (unlabeled_path, False)):
                chosen = [i for i, flag in enumerate(is_labeled) if flag == keep]
                content = source.subset(chosen)
                counts.append((len(chosen), sum(source.annotation_counts[i] for i in chosen)))
                if _write_if_changed(path, content):
                    written.append(path)
            results.append(FoldFiles(
                fold=fold,
                percent=percent,
                labeled=labeled_path,
                unlabeled=unlabeled_path,
                num_labeled=counts[0][0],
                num_unlabeled=counts[1][0],
                labeled_annotations=counts[0][1],
                unlabeled_annotations=counts[1][1],
                written=tuple(written),
            ))
    return results


def _check_request(percent: float, fold: int) -> None:
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real) or not (
        0 < percent <= 100
    ):
        raise FoldError(f"percent={percent!r} must be a number in (0, 100], e.g. 1, 5, 10 or 0.5")
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or fold < 0:
        raise FoldError(f"fold={fold!r} must be a non-negative integer, e.g. 1..5")


def _rank(key: bytes, image_id: int) -> bytes:
    return hashlib.blake2b(str(image_id).encode(), digest_size=8, key=key).digest()


class _EncodedCoco:
    """A COCO file with each image and its annotations already encoded as JSON text."""

    def __init__(
        self,
        image_ids: list[int],
        image_json: list[str],
        annotation_json: list[str],
        annotation_counts: list[int],
        head: str,
        tail: str,
    ) -> None:
        self.image_ids = image_ids
        self.image_json = image_json
        self.annotation_json = annotation_json
        self.annotation_counts = annotation_counts
        self.head = head
        self.tail = tail

    @classmethod
    def read(cls, ann_file: Path) -> _EncodedCoco:
        content = read_coco_json(ann_file)
        position: dict[int, int] = {}
        for index, image in enumerate(content["images"]):
            image_id = image.get("id") if isinstance(image, dict) else None
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                raise CocoFormatError(
                    f"{ann_file}: image {index} has no integer 'id'; give every image an id"
                )
            if image_id in position:
                raise CocoFormatError(
                    f"{ann_file}: image id {image_id} appears twice (image {index}); "
                    "give each image its own id"
                )
            position[image_id] = index
        grouped: list[list[dict]] = [[] for _ in content["images"]]
        for index, ann in enumerate(content["annotations"]):
            slot = position.get(ann.get("image_id")) if isinstance(ann, dict) else None
            if slot is None:
                raise CocoFormatError(
                    f"{ann_file}: annotation {index} points to no image in 'images'; "
                    "remove it or add its image"
                )
            grouped[slot].append(ann)

        # Every top-level key but images and annotations passes through unchanged.
        others = {k: v for k, v in content.items() if k not in ("images", "annotations")}
        head = _dumps(others)[:-1] + ("," if others else "")
        return cls(
            image_ids=list(position),
            image_json=[_dumps(image) for image in content["images"]],
            annotation_json=[_dumps(anns)[1:-1] for anns in grouped],
            annotation_counts=[len(anns) for anns in grouped],
            head=head,
            tail="}",
        )

    def subset(self, indices: list[int]) -> bytes:
        """The file's bytes for the images at ``indices`` (file order) and their annotations."""
        images = ",".join(self.image_json[i] for i in indices)
        annotations = ",".join(self.annotation_json[i] for i in indices if self.annotation_json[i])
        text = f'{self.head}"images":[{images}],"annotations":[{annotations}]{self.tail}'
        return text.encode("utf-8")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _write_if_changed(path: Path, content: bytes) -> bool:
    """Atomically replace ``path`` with ``content`` unless it already holds those bytes."""
    if _holds(path, content):
        return False
    write_atomically(path, content)
    return True


def _holds(path: Path, content: bytes) -> bool:
    """Whether ``path`` has exactly ``content``: compared block by block, cheaper than hashing."""
    if not path.is_file() or path.stat().st_size != len(content):
        return False
    view = memoryview(content)
    block = 1 << 22
    with path.open("rb") as handle:
        for start in range(0, len(content), block):
            if handle.read(block) != view[start : start + block]:
                return False
    return True
