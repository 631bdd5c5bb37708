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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softteacher.data.coco import CocoDataset
from softteacher.data.images import CorruptImageError
from softteacher.data.samples import ImageRecord

# Bump whenever the schema or the row layout changes: old caches then miss instead of lying.
LAYOUT_VERSION = 1
# Rows a Parquet row group: the unit a Ray Data read task reads. Small, so the first
# augmented rows reach the trainer after ~32 images, not after a whole shard.
ROW_GROUP_ROWS = 32
SUCCESS_MARKER = "_SUCCESS"
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


def write_shards(dataset: CocoDataset, cache_dir: Path, *, rows_per_shard: int = 256) -> ShardSet:
    """The dataset's shards under ``cache_dir``, written only when no complete copy exists.

    Every image file must exist and be non-empty (checked here, one ``stat`` each, because
    the cache key needs its size and mtime anyway); whether it decodes is checked in the
    stream, which names the file (decoding all of COCO here would take too long).
    Memory stays at one shard's image bytes.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    if not dataset.records:
        raise EmptyDatasetError(
            f"annotation file {dataset.ann_file} has no images to shard; check the file"
        )
    records = sorted(dataset.records, key=lambda record: record.image_id)
    paths = [dataset.image_path(record) for record in records]
    key = content_key(records, [_checked_stat(path, dataset) for path in paths], rows_per_shard)

    cache_dir = Path(cache_dir)
    final = cache_dir / key
    existing = _complete_set(final, key)
    if existing is not None:
        return existing
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        _write_parts(staging, records, paths, rows_per_shard)
        _publish(staging, final, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    complete = _complete_set(final, key)
    if complete is None:  # only if someone removed it between our rename and this read
        raise RuntimeError(f"shard set {final} vanished right after it was written; rerun")
    return complete


def content_key(
    records: Sequence[ImageRecord], image_stats: Sequence[tuple[int, int]], rows_per_shard: int
) -> str:
    """Hash of what decides the shards' bytes: records, image (size, mtime_ns), layout.

    Sizes and mtimes stand in for the image bytes: hashing COCO's 18 GB on every start would
    cost minutes, and a replaced file changes its mtime.
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


def _checked_stat(path: Path, dataset: CocoDataset) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as error:
        raise CorruptImageError(
            f"image {path} listed in {dataset.ann_file} cannot be read "
            f"({error.strerror or type(error).__name__}); check the image root or remove "
            "the image from the annotation file"
        ) from None
    if stat.st_size == 0:
        raise CorruptImageError(
            f"image {path} listed in {dataset.ann_file} is empty (0 bytes); "
            "re-download it or remove it from the annotation file"
        )
    return stat.st_size, stat.st_mtime_ns


def _write_parts(
    folder: Path, records: list[ImageRecord], paths: list[Path], rows_per_shard: int
) -> None:
    """One Parquet file a slice of rows, then the marker that lists them."""
    names = []
    for index, start in enumerate(range(0, len(records), rows_per_shard)):
        stop = start + rows_per_shard
        name = f"part-{index:05d}.parquet"
        table = _shard_table(records[start:stop], paths[start:stop])
        # Images are JPEG/PNG already: compressing them again costs time and saves nothing.
        pq.write_table(table, folder / name, compression="none", row_group_size=ROW_GROUP_ROWS)
        names.append(name)
    marker = {"layout_version": LAYOUT_VERSION, "num_rows": len(records), "files": names}
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
    return ShardSet(root=folder, files=files, num_rows=int(content["num_rows"]), key=key)
