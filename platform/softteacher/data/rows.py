"""A stream's rows, defined once: which image its n-th row is, and how that row is augmented.

Both data paths use this module: the Ray Data actors (``ray_stream.py``) and the in-process
stream (``steps.py``) call ``AugmentedRows.rows(start, stop)``, so a run debugged in one
process sees the rows the cluster sees, image for image and pixel for pixel.

Determinism comes from content, never from scheduling:
- **Order.** A stream of ``N`` images visits them epoch after epoch; epoch ``e`` is a
  permutation drawn from ``(seed, stream, e)``. Train worker ``rank`` of ``world_size`` takes
  global positions ``rank, rank + world_size, ...``, so its ``i``-th row is a pure function
  of ``(seed, stream, i, rank, world_size)``.
- **Augmentation.** Each row draws from its own generator seeded by
  ``(seed, stream, epoch, image_id)``: the same image in the same epoch gets the same views
  whichever actor, process or call makes them.
- **Position.** A stream's position is the number of rows it has handed out; a checkpoint
  stores it, and a resumed stream starts exactly there (mid-epoch included).

Rows travel as Arrow tables in a flat form Ray Data moves without tensor extension types: an
image is its raw ``uint8`` HWC bytes plus ``height``/``width``, boxes are 4 floats a box, a
view's matrix is 9 floats (row-major 3x3).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softteacher.config import AugmentConfig
from softteacher.data.images import decode_image
from softteacher.data.samples import ImageRecord, LabeledSample, UnlabeledSample, View
from softteacher.data.shards import EmptyDatasetError, ShardSet
from softteacher.data.transforms import labeled_sample, unlabeled_sample

StreamKind = Literal["labeled", "unlabeled"]
STREAM_IDS: dict[str, int] = {"labeled": 0, "unlabeled": 1}
# Decoded row groups an ``AugmentedRows`` keeps: an epoch visits rows in a random order, so
# a small cache saves re-reading a group for neighbours that come close together.
ROW_GROUP_CACHE = 8

_IMAGE_FIELDS = (("height", pa.int32()), ("width", pa.int32()))
LABELED_ROW_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("image", pa.binary()),
        *_IMAGE_FIELDS,
        ("boxes", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
    ]
)
UNLABELED_ROW_SCHEMA = pa.schema(
    [("image_id", pa.int64())]
    + [
        field
        for view in ("weak", "strong")
        for field in (
            (view, pa.binary()),
            (f"{view}_height", pa.int32()),
            (f"{view}_width", pa.int32()),
            (f"{view}_matrix", pa.list_(pa.float64())),
        )
    ]
)


@dataclass(frozen=True)
class StreamPlan:
    """Which shard row the ``i``-th row of one worker's stream is, and the epoch it is in."""

    stream: StreamKind
    num_images: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise EmptyDatasetError(f"the {self.stream} stream has no images to stream")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(epoch, shard row)`` of each of this worker's row positions."""
        global_positions = np.asarray(positions, dtype=np.int64) * self.world_size + self.rank
        epochs, offsets = np.divmod(global_positions, self.num_images)
        rows = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self.epoch_order(int(epoch))[offsets[mask]]
        return epochs, rows

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shard rows of one epoch, in the order the stream visits them (drawn once an
        epoch: a segment of rows asks for it again, and COCO has 118k images to permute)."""
        stream_id = STREAM_IDS[self.stream]
        return _epoch_order(_nonnegative(self.seed), stream_id, epoch, self.num_images)

    def row_generator(self, epoch: int, image_id: int) -> np.random.Generator:
        """The generator of one row's augmentation draws: content, not scheduling."""
        return np.random.default_rng(
            (_nonnegative(self.seed), STREAM_IDS[self.stream], int(epoch), int(image_id))
        )


class AugmentedRows:
    """Random access to a shard set's rows, augmented as ``plan`` says.

    Cheap to build (it reads the Parquet footers only), so every Data actor and every
    in-process stream builds its own.
    """

    def __init__(self, shards: ShardSet, plan: StreamPlan, cfg: AugmentConfig) -> None:
        if plan.num_images != shards.num_rows:
            raise ValueError(
                f"the {plan.stream} plan has {plan.num_images} images but shards "
                f"{shards.root} hold {shards.num_rows}"
            )
        self.shards = shards
        self.plan = plan
        self.cfg = cfg
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    @cached_property
    def _group_starts(self) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """The first shard row of every row group, and where each group lives."""
        starts, where, total = [], [], 0
        for path in self.shards.files:
            metadata = pq.ParquetFile(path).metadata
            for group in range(metadata.num_row_groups):
                starts.append(total)
                where.append((str(path), group))
                total += metadata.row_group(group).num_rows
        return np.asarray(starts, dtype=np.int64), where

    def rows(self, start: int, stop: int) -> pa.Table:
        """Augmented rows of positions ``[start, stop)`` of this worker's stream."""
        epochs, shard_rows = self.plan.locate(np.arange(start, stop))
        samples = [
            self._sample(self._shard_row(int(row)), int(epoch))
            for epoch, row in zip(epochs, shard_rows, strict=True)
        ]
        if self.plan.stream == "labeled":
            return labeled_table(samples)
        return unlabeled_table(samples)

    def _shard_row(self, row: int) -> dict:
        starts, where = self._group_starts
        group = int(np.searchsorted(starts, row, side="right")) - 1
        table = self._groups.get(group)
        if table is None:
            path, index = where[group]
            table = pq.ParquetFile(path).read_row_group(index)
            self._groups[group] = table
            if len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(group)
        return table.slice(row - int(starts[group]), 1).to_pylist()[0]

    def _sample(self, row: dict, epoch: int) -> LabeledSample | UnlabeledSample:
        record = ImageRecord(
            image_id=row["image_id"],
            file_name=row["file_name"],
            width=row["width"],
            height=row["height"],
            boxes=np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(row["labels"], dtype=np.int64),
        )
        image = decode_image(
            row["image"],
            f"{record.file_name} (image id {record.image_id}, shards {self.shards.root})",
            (record.width, record.height),
        )
        rng = self.plan.row_generator(epoch, record.image_id)
        if self.plan.stream == "labeled":
            return labeled_sample(record, image, self.cfg, rng)
        return unlabeled_sample(record, image, self.cfg, rng)


# --------------------------------------------------------------------------- samples <-> rows


def labeled_table(samples: list[LabeledSample]) -> pa.Table:
    return pa.table(
        {
            "image_id": [s.image_id for s in samples],
            "image": [s.image.tobytes() for s in samples],
            "height": [s.image.shape[0] for s in samples],
            "width": [s.image.shape[1] for s in samples],
            "boxes": [s.boxes.reshape(-1) for s in samples],
            "labels": [s.labels.reshape(-1) for s in samples],
        },
        schema=LABELED_ROW_SCHEMA,
    )


def unlabeled_table(samples: list[UnlabeledSample]) -> pa.Table:
    columns: dict[str, list] = {"image_id": [s.image_id for s in samples]}
    for name in ("weak", "strong"):
        views = [getattr(s, name) for s in samples]
        columns[name] = [v.image.tobytes() for v in views]
        columns[f"{name}_height"] = [v.image.shape[0] for v in views]
        columns[f"{name}_width"] = [v.image.shape[1] for v in views]
        columns[f"{name}_matrix"] = [np.asarray(v.matrix, np.float64).reshape(9) for v in views]
    return pa.table(columns, schema=UNLABELED_ROW_SCHEMA)


def labeled_samples(batch: pa.Table) -> list[LabeledSample]:
    """Rows of ``LABELED_ROW_SCHEMA`` back to the samples ``collate_labeled`` takes."""
    rows = batch.to_pydict()
    return [
        LabeledSample(
            image_id=image_id,
            image=_pixels(image, height, width),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
        )
        for image_id, image, height, width, boxes, labels in zip(
            rows["image_id"],
            rows["image"],
            rows["height"],
            rows["width"],
            rows["boxes"],
            rows["labels"],
            strict=True,
        )
    ]


def unlabeled_samples(batch: pa.Table) -> list[UnlabeledSample]:
    """Rows of ``UNLABELED_ROW_SCHEMA`` back to the samples ``collate_unlabeled`` takes."""
    rows = batch.to_pydict()

    def view(name: str, index: int) -> View:
        return View(
            image=_pixels(
                rows[name][index], rows[f"{name}_height"][index], rows[f"{name}_width"][index]
            ),
            matrix=np.asarray(rows[f"{name}_matrix"][index], dtype=np.float64).reshape(3, 3),
        )

    return [
        UnlabeledSample(image_id=image_id, weak=view("weak", i), strong=view("strong", i))
        for i, image_id in enumerate(rows["image_id"])
    ]


def _pixels(data: bytes, height: int, width: int) -> np.ndarray:
    # A writable copy: torch.from_numpy warns on (and must not share) a read-only buffer.
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(height, width, 3)


@lru_cache(maxsize=4)
def _epoch_order(seed: int, stream_id: int, epoch: int, num_images: int) -> np.ndarray:
    order = np.random.default_rng((seed, stream_id, epoch)).permutation(num_images)
    order.flags.writeable = False  # shared by every caller of the cache
    return order


def _nonnegative(seed: int) -> int:
    """numpy seeds take non-negative integers only."""
    return seed % (1 << 63)
