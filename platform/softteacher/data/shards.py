"""A COCO set as Parquet shards, cached by content, for Ray Data to stream.

Ray Data reads a few large files far faster than many small ones, and a shard can carry
the annotations beside the encoded image bytes, so a Data actor needs nothing but its rows.
Images stay encoded (as on disk): decoding happens per step in the stream, where the
augmentation needs the pixels anyway.

Layout (``LAYOUT_VERSION``): rows sorted by ``image_id``, shard ``i`` holds rows
``[i * k, (i + 1) * k)`` in ``part-0000i.parquet``, in row groups of ``ROW_GROUP_ROWS``.
A set lives in ``cache_dir/<key>/`` where the key hashes everything that decides its
bytes, so a second call with the same content finds it and writes nothing, and a changed
annotation or image file gets a new key. The set is written into a temporary folder and
renamed into place with its ``_SUCCESS`` marker already inside: a killed conversion never
looks complete (it leaves a ``.<key>.*`` folder, safe to delete when no conversion runs).

A conversion first decodes every image once (:mod:`softteacher.data.image_check`): an image
that does not decode is left out (listed in ``skipped_images.json``) or stops the
conversion, and a row's ``width``/``height`` are the image's real size. A cached set is
not checked again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softteacher.data.coco import CocoDataset
from softteacher.data.image_check import SetCheck, check_records, first_names, image_stat
from softteacher.data.images import CorruptImageError
from softteacher.data.samples import ImageRecord

# Bump whenever the schema or the row layout changes: old caches then miss instead of lying.
# 2: images decode-checked at conversion, bad ones left out, width/height the real size.
LAYOUT_VERSION = 2
# Rows a Parquet row group: the unit a Ray Data read task reads. Small, so the first
# augmented rows reach the trainer after ~32 images, not after a whole shard.
ROW_GROUP_ROWS = 32
SUCCESS_MARKER = "_SUCCESS"
SKIPPED_LIST = "skipped_images.json"  # in the set's folder: the images left out, and why
BadImagePolicy = Literal["skip", "fail"]
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("boxes", pa.list_(pa.float32())),  # flattened x1, y1, x2, y2: 4 values a box
        ("labels", pa.list_(pa.int64())),
    ]
)


class EmptyDatasetError(ValueError):
    """A dataset without images: sharding or streaming it would never yield a row."""


@dataclass(frozen=True)
class ShardSet:
    """A complete, immutable set of shards: ``files`` in row order, ``key`` names the content."""

    root: Path
    files: tuple[Path, ...]
    num_rows: int
    key: str
    num_skipped: int = 0  # images left out because they do not decode (``SKIPPED_LIST``)


def write_shards(
    dataset: CocoDataset,
    cache_dir: Path,
    *,
    rows_per_shard: int = 256,
    on_bad_image: BadImagePolicy = "skip",
) -> ShardSet:
    """The dataset's shards under ``cache_dir``, written only when no complete copy exists.

    Every image file must exist (one ``stat`` each, which the cache key needs anyway). A
    conversion decodes every image once first: one that does not decode (empty, truncated,
    not an image) is left out with one warning line and listed in the set's
    ``skipped_images.json`` (``on_bad_image="skip"``), or stops it with one
    :class:`CorruptImageError` before anything is written (``"fail"``; also raised for a
    cached set that left images out). An image whose real size is not the annotated one
    gets one warning line a set; its row holds the real size and the boxes as annotated
    (the stream clips them to the image). Memory stays at one shard's image bytes.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
    if not dataset.records:
        raise EmptyDatasetError(
            f"annotation file {dataset.ann_file} has no images to shard; check the file"
        )
    records = sorted(dataset.records, key=lambda record: record.image_id)
    paths = [dataset.image_path(record) for record in records]
    stats = [image_stat(path, dataset.ann_file) for path in paths]
    key = content_key(records, stats, rows_per_shard)

    cache_dir = Path(cache_dir)
    final = cache_dir / key
    existing = _complete_set(final, key)
    if existing is not None:
        if existing.num_skipped and on_bad_image == "fail":
            listed = json.loads((final / SKIPPED_LIST).read_text())
            bad = [(entry["file_name"], entry["error"]) for entry in listed]
            raise CorruptImageError(_bad_images_line(dataset, bad))
        if existing.num_skipped:  # said again at every use: the set is smaller than its file
            _warn(
                f"{existing.num_skipped} of {len(records)} images in {dataset.ann_file} are "
                f"left out (they do not decode; the list is in {final / SKIPPED_LIST})"
            )
        return existing
    checked = check_records(records, paths, stats, dataset.ann_file.name)
    if checked.bad and on_bad_image == "fail":
        raise CorruptImageError(_bad_images_line(dataset, checked.bad))
    if len(checked.bad) == len(records):
        raise EmptyDatasetError(
            f"none of the {len(records)} images in {dataset.ann_file} can be decoded (first: "
            f"{checked.bad[0][1]}); check the image root and the files"
        )
    if checked.resized:
        _warn(
            f"{checked.resized_line('images', dataset.ann_file)}; training uses the real "
            "size, the boxes as annotated (clipped to the image)"
        )
    kept, kept_paths, skipped = _split_bad(records, paths, checked)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        _write_parts(staging, kept, kept_paths, rows_per_shard, skipped)
        _publish(staging, final, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    complete = _complete_set(final, key)
    if complete is None:  # only if someone removed it between our rename and this read
        raise RuntimeError(f"shard set {final} vanished right after it was written; rerun")
    if skipped:
        _warn(
            f"{len(skipped)} of {len(records)} images in {dataset.ann_file} cannot be "
            f"decoded and are left out (first: {skipped[0]['error']}); the list is in "
            f"{final / SKIPPED_LIST}"
        )
    return complete


def _split_bad(
    records: list[ImageRecord], paths: list[Path], checked: SetCheck
) -> tuple[list[ImageRecord], list[Path], list[dict]]:
    """The records that decode, at their real size, their paths, and the skipped list."""
    kept, kept_paths, skipped = [], [], []
    errors = iter(message for _, message in checked.bad)  # in record order
    for record, path, size in zip(records, paths, checked.sizes, strict=True):
        if size is None:
            skipped.append(
                {"image_id": record.image_id, "file_name": record.file_name, "error": next(errors)}
            )
        else:
            kept.append(replace(record, width=size[0], height=size[1]))
            kept_paths.append(path)
    return kept, kept_paths, skipped


def _bad_images_line(dataset: CocoDataset, bad: Sequence[tuple[str, str]]) -> str:
    return (
        f"{len(bad)} of {len(dataset.records)} images in {dataset.ann_file} cannot be decoded: "
        f"{first_names(bad)} (first: {bad[0][1]}); re-download or remove them, or pass "
        "--on-bad-image skip"
    )


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def content_key(
    records: Sequence[ImageRecord], image_stats: Sequence[tuple[int, int]], rows_per_shard: int
) -> str:
    """Hash of what decides the shards' bytes: records, image (size, mtime_ns), layout.

    Sizes and mtimes stand in for the image bytes: hashing COCO's 18 GB on every start would
    cost minutes, and a replaced file changes its mtime. The decode check's outcome (the
    images left out, the real sizes) follows from the image bytes, so it needs no part of
    its own; nor does the bad-image policy: with ``"fail"`` nothing is written.
    """
    digest = hashlib.sha256()
    digest.update(struct.pack("<qq", LAYOUT_VERSION, rows_per_shard))
    for record, (size, mtime_ns) in zip(records, image_stats, strict=True):
        name = record.file_name.encode("utf-8")
        boxes = np.ascontiguousarray(record.boxes, dtype="<f4").reshape(-1, 4)
        labels = np.ascontiguousarray(record.labels, dtype="<i8").reshape(-1)
        digest.update(struct.pack("<qqqqqqq", record.image_id, len(name), record.width,
                                  record.height, len(boxes), size, mtime_ns))
        digest.update(name)
        digest.update(boxes.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()[:20]


def _write_parts(
    folder: Path,
    records: list[ImageRecord],
    paths: list[Path],
    rows_per_shard: int,
    skipped: list[dict],
) -> None:
    """One Parquet file a slice of rows, the images left out, then the marker."""
    names = []
    for index, start in enumerate(range(0, len(records), rows_per_shard)):
        stop = start + rows_per_shard
        name = f"part-{index:05d}.parquet"
        table = _shard_table(records[start:stop], paths[start:stop])
        # Images are JPEG/PNG already: compressing them again costs time and saves nothing.
        pq.write_table(table, folder / name, compression="none", row_group_size=ROW_GROUP_ROWS)
        names.append(name)
    (folder / SKIPPED_LIST).write_text(json.dumps(skipped, indent=1))
    marker = {
        "layout_version": LAYOUT_VERSION,
        "num_rows": len(records),
        "num_skipped": len(skipped),
        "files": names,
    }
    (folder / SUCCESS_MARKER).write_text(json.dumps(marker, indent=1))


def _shard_table(records: list[ImageRecord], paths: list[Path]) -> pa.Table:
    boxes = [np.asarray(record.boxes, dtype=np.float32).reshape(-1) for record in records]
    labels = [np.asarray(record.labels, dtype=np.int64).reshape(-1) for record in records]
    columns = {
        "image_id": pa.array([record.image_id for record in records], pa.int64()),
        "file_name": pa.array([record.file_name for record in records], pa.string()),
        "width": pa.array([record.width for record in records], pa.int32()),
        "height": pa.array([record.height for record in records], pa.int32()),
        "image": pa.array([path.read_bytes() for path in paths], pa.binary()),
        "boxes": _list_array(boxes, pa.float32()),
        "labels": _list_array(labels, pa.int64()),
    }
    return pa.table(columns, schema=SHARD_SCHEMA)


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def _publish(staging: Path, final: Path, key: str) -> None:
    """Rename the finished folder into place; a complete copy already there wins (a
    concurrent conversion of the same content), a damaged one is replaced."""
    if final.exists() and _complete_set(final, key) is None:
        shutil.rmtree(final)
    try:
        os.rename(staging, final)
    except OSError:
        if _complete_set(final, key) is None:
            raise


def _complete_set(folder: Path, key: str) -> ShardSet | None:
    marker = folder / SUCCESS_MARKER
    if not marker.is_file():
        return None
    content = json.loads(marker.read_text())
    if content.get("layout_version") != LAYOUT_VERSION:
        return None
    files = tuple(folder / name for name in content["files"])
    if not all(path.is_file() for path in files):
        return None
    return ShardSet(
        root=folder,
        files=files,
        num_rows=int(content["num_rows"]),
        key=key,
        num_skipped=int(content.get("num_skipped", 0)),
    )
