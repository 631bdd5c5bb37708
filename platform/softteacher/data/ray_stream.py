"""Ray Data streams of augmented samples, and the per-step batches a Train worker takes.

A pool of Data actors (``map_batches`` with a class) reads the shards' row groups, decodes
and augments them, so none of that runs in the training worker. Rows leave the actors in
a flat Arrow form Ray Data moves without tensor extension types: an image is its raw
``uint8`` HWC bytes plus ``height``/``width`` columns, boxes are 4 floats a box, a view's
matrix is 9 floats (row-major 3x3). ``StepBatches`` rebuilds the samples of ``samples.py``
from those rows and hands them to ``collate.py``, so tensors are made in one place for
both the in-process and the Ray paths.

Randomness: each actor draws a call's augmentations from a generator seeded with
``(seed, actor id, call counter)``. Actor ids are random and which actor gets which row
group depends on scheduling, so augmentation in the Ray path is NOT bit-reproducible
across runs (``streams.py`` is the reproducible single-process path). The row-group order
and the local shuffle of an epoch are seeded from the seed and the epoch, but the order in
which rows reach the shuffle buffer still depends on scheduling.

Resources, sized for the 2-core machine: a Tune trial (0.01 CPU) and its Train worker
(1 CPU) leave 0.99 logical CPU, and Ray places a task or actor only when its whole request
fits. The only requests in the stream are the actors': ``DATA_ACTOR_CPUS = 0.25`` each,
so the labeled and the unlabeled pool's first actors take 0.5 together and each pool can
grow to its second actor while room remains (four would ask 1.0: the last never starts,
which is harmless). These are logical shares: augmenting is cheap next to a training step
(hundreds of images/s against ~6 for the slim detector), so sharing the cores costs little.
Each epoch is a new Ray Data execution, which starts its actors again (a few seconds on
this machine). A 1% fold of the synthetic set has 20 labeled images, four steps' worth: so
one execution (a stream "epoch") lists the row groups as many times as it takes to hold at
least ``min_rows_per_epoch`` rows, each pass augmented afresh, and the restart cost is paid
once every few hundred steps instead of every few.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy, DataIterator, RandomSeedConfig

from softteacher.config import AugmentConfig
from softteacher.data.collate import (
    DetectionBatch,
    UnlabeledBatch,
    collate_labeled,
    collate_unlabeled,
)
from softteacher.data.images import decode_image
from softteacher.data.samples import ImageRecord, LabeledSample, UnlabeledSample, View
from softteacher.data.shards import ShardSet
from softteacher.data.transforms import labeled_sample, unlabeled_sample

StreamKind = Literal["labeled", "unlabeled"]

DATA_ACTOR_CPUS = 0.25
MIN_ROWS_PER_EPOCH = 2048
# Rows the local shuffle buffer holds before it yields. Bounded because the rows are decoded
# views (~0.3 MB each at the cpu preset, ~6 MB at paper sizes); the row groups' order is
# also shuffled every epoch, so the buffer only has to mix a few row groups.
SHUFFLE_BUFFER_ROWS = 64

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


RowConverter = Callable[
    [list[ImageRecord], list[np.ndarray], AugmentConfig, np.random.Generator], pa.Table
]


class ShardTooSmallError(ValueError):
    """A worker's data shard holds fewer rows than one step takes: it would never yield."""


# --------------------------------------------------------------------------- datasets


def labeled_dataset(
    shards: ShardSet,
    cfg: AugmentConfig,
    *,
    seed: int,
    concurrency: tuple[int, int] = (1, 2),
    num_cpus: float = DATA_ACTOR_CPUS,
    min_rows_per_epoch: int = MIN_ROWS_PER_EPOCH,
) -> ray.data.Dataset:
    """Rows of ``LABELED_ROW_SCHEMA``: ``cfg.labeled_view`` of each image, boxes mapped into it."""
    return _augmented(shards, "labeled", cfg, seed, concurrency, num_cpus, min_rows_per_epoch)


def unlabeled_dataset(
    shards: ShardSet,
    cfg: AugmentConfig,
    *,
    seed: int,
    concurrency: tuple[int, int] = (1, 2),
    num_cpus: float = DATA_ACTOR_CPUS,
    min_rows_per_epoch: int = MIN_ROWS_PER_EPOCH,
) -> ray.data.Dataset:
    """Rows of ``UNLABELED_ROW_SCHEMA``: weak and strong view of each image with their matrices."""
    return _augmented(shards, "unlabeled", cfg, seed, concurrency, num_cpus, min_rows_per_epoch)


def _augmented(
    shards: ShardSet,
    kind: StreamKind,
    cfg: AugmentConfig,
    seed: int,
    concurrency: tuple[int, int],
    num_cpus: float,
    min_rows_per_epoch: int,
) -> ray.data.Dataset:
    low, high = concurrency
    if not 1 <= low <= high:
        raise ValueError(f"concurrency must be (min, max) with 1 <= min <= max, got {concurrency}")
    passes = max(1, -(-min_rows_per_epoch // max(shards.num_rows, 1)))
    return row_groups(shards, seed=seed, passes=passes).map_batches(
        AugmentActor,
        fn_constructor_kwargs={
            "kind": kind,
            "cfg": cfg,
            "seed": seed,
            "shards_root": str(shards.root),
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=num_cpus,
    )


def row_groups(shards: ShardSet, *, seed: int, passes: int = 1) -> ray.data.Dataset:
    """One row ``{path, row_group}`` a Parquet row group (``passes`` times each), one block
    each, in a new random order every epoch (execution): the work list of the Data actors.

    Why not ``ray.data.read_parquet`` and a read stage: in Ray 2.60 it plans a ``ListFiles``
    task that always asks for 1 CPU, which never fits beside a 1-CPU Train worker and a Tune
    trial on 2 cores (the stream hung there); and separate fractional-CPU read tasks start
    many worker processes (each imports torch), which took ~20 s of a 2-core machine
    before the first step. The actors read their row groups themselves (footers and a few
    MB: milliseconds), so every CPU request in the stream is ``num_cpus`` of an actor.
    One row group (``ROW_GROUP_ROWS``) a call also bounds what an actor holds.
    """
    units = [
        {"path": str(path), "row_group": group}
        for path in shards.files
        for group in range(pq.ParquetFile(path).num_row_groups)
    ] * passes
    work = ray.data.from_items(units, override_num_blocks=len(units))
    return work.randomize_block_order(
        seed=RandomSeedConfig(seed=_nonnegative(seed), reseed_after_execution=True)
    )


class AugmentActor:
    """The Data actor's UDF: row groups of the shards to augmented rows."""

    def __init__(self, kind: StreamKind, cfg: AugmentConfig, seed: int, shards_root: str) -> None:
        self._convert: RowConverter = _labeled_rows if kind == "labeled" else _unlabeled_rows
        self._cfg = cfg
        self._seed = _nonnegative(seed)
        self._actor_key = _actor_key()
        self._calls = 0
        self._shards_root = shards_root

    def __call__(self, units: pa.Table) -> pa.Table:
        paths, groups = units.column("path").to_pylist(), units.column("row_group").to_pylist()
        rows = [pq.ParquetFile(p).read_row_group(g) for p, g in zip(paths, groups, strict=True)]
        return self.augment(pa.concat_tables(rows))

    def augment(self, rows: pa.Table) -> pa.Table:
        """Shard rows (``SHARD_SCHEMA``: encoded images, annotations) to augmented rows."""
        rng = np.random.default_rng((self._seed, self._actor_key, self._calls))
        self._calls += 1
        records = _records(rows)
        images = [
            decode_image(
                data,
                f"{record.file_name} (image id {record.image_id}, shards {self._shards_root})",
                (record.width, record.height),
            )
            for record, data in zip(records, rows.column("image").to_pylist(), strict=True)
        ]
        return self._convert(records, images, self._cfg, rng)


def _actor_key() -> int:
    """A number unique to this actor (its Ray actor id), the pid outside an actor."""
    actor_id = ray.get_runtime_context().get_actor_id()
    return int(actor_id, 16) if actor_id else os.getpid()


def _records(batch: pa.Table) -> list[ImageRecord]:
    columns = batch.select(["image_id", "file_name", "width", "height", "boxes", "labels"])
    rows = columns.to_pydict()
    return [
        ImageRecord(
            image_id=image_id,
            file_name=file_name,
            width=width,
            height=height,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
        )
        for image_id, file_name, width, height, boxes, labels in zip(
            rows["image_id"],
            rows["file_name"],
            rows["width"],
            rows["height"],
            rows["boxes"],
            rows["labels"],
            strict=True,
        )
    ]


def _labeled_rows(
    records: list[ImageRecord],
    images: list[np.ndarray],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> pa.Table:
    samples = [labeled_sample(r, image, cfg, rng) for r, image in zip(records, images, strict=True)]
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


def _unlabeled_rows(
    records: list[ImageRecord],
    images: list[np.ndarray],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> pa.Table:
    samples = [unlabeled_sample(r, img, cfg, rng) for r, img in zip(records, images, strict=True)]
    columns: dict[str, list] = {"image_id": [s.image_id for s in samples]}
    for name in ("weak", "strong"):
        views = [getattr(s, name) for s in samples]
        columns[name] = [v.image.tobytes() for v in views]
        columns[f"{name}_height"] = [v.image.shape[0] for v in views]
        columns[f"{name}_width"] = [v.image.shape[1] for v in views]
        columns[f"{name}_matrix"] = [np.asarray(v.matrix, np.float64).reshape(9) for v in views]
    return pa.table(columns, schema=UNLABELED_ROW_SCHEMA)


# --------------------------------------------------------------------------- rows to samples


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


# --------------------------------------------------------------------------- step batches


class EpochBatches:
    """Arrow batches of exactly ``rows`` rows from one shard, epoch after epoch, each epoch
    reshuffled with ``epoch_seed``; ``epoch`` and ``batches_in_epoch`` say where it is.

    A short last batch of an epoch is dropped (drop_last by hand, so the rows of an epoch are
    counted and a shard too small for one batch fails with its size instead of looping).
    """

    def __init__(
        self,
        name: StreamKind,
        shard: DataIterator,
        rows: int,
        *,
        seed: int,
        start_epoch: int = 0,
        shuffle_buffer_rows: int = SHUFFLE_BUFFER_ROWS,
    ) -> None:
        if rows < 1:
            raise ValueError(f"{name}_per_step must be at least 1, got {rows}")
        self.name = name
        self.epoch = start_epoch
        self.batches_in_epoch = 0
        self._shard = shard
        self._rows = rows
        self._seed = seed
        self._buffer = max(shuffle_buffer_rows, rows)
        self._batches: Iterator[pa.Table] | None = None
        self._rows_in_epoch = 0

    def next_batch(self) -> pa.Table:
        while True:
            if self._batches is None:
                self._batches = iter(
                    self._shard.iter_batches(
                        batch_size=self._rows,
                        batch_format="pyarrow",
                        drop_last=False,
                        local_shuffle_buffer_size=self._buffer,
                        local_shuffle_seed=epoch_seed(self._seed, self.name, self.epoch),
                    )
                )
                self._rows_in_epoch = 0
            for batch in self._batches:
                self._rows_in_epoch += batch.num_rows
                if batch.num_rows == self._rows:
                    self.batches_in_epoch += 1
                    return batch
            if self.batches_in_epoch == 0:
                raise ShardTooSmallError(
                    f"the {self.name} data shard of this Train worker has "
                    f"{self._rows_in_epoch} rows, fewer than the {self._rows} one step takes "
                    f"({self.name}_per_step); use fewer Train workers, a smaller "
                    f"{self.name}_per_step, or a fold with more {self.name} images"
                )
            self._batches = None
            self.epoch += 1
            self.batches_in_epoch = 0


def epoch_seed(seed: int, stream: str, epoch: int) -> int:
    """The local shuffle seed of one stream's epoch: a 32-bit hash of the three."""
    digest = hashlib.sha256(f"{seed}:{stream}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class StepBatches:
    """One worker's step data: ``labeled(images)`` and ``unlabeled()`` batches, drawn on demand.

    Labeled images come in units of ``labeled_per_step`` (a burn-in step takes several units,
    as many images as a supervised step), unlabeled ones ``unlabeled_per_step`` at a time; a
    stream that is never asked for never starts. ``position()`` is the data position to
    checkpoint; passing it back as ``start_epoch`` resumes each stream at the start of the
    epoch it was in (rows of an epoch arrive in a scheduling-dependent order, so a mid-epoch
    offset could not be replayed). Every Train worker must take the same number of steps:
    Ray's streaming split starts an epoch only when all workers ask for it.
    """

    def __init__(
        self,
        labeled_shard: DataIterator,
        unlabeled_shard: DataIterator | None,
        labeled_per_step: int,
        unlabeled_per_step: int,
        device: torch.device | str,
        *,
        seed: int,
        start_epoch: int | Mapping[str, int] = 0,
        shuffle_buffer_rows: int = SHUFFLE_BUFFER_ROWS,
    ) -> None:
        starts = _start_epochs(start_epoch)
        self.device = torch.device(device)
        # Which images the last batches used (DetectionBatch carries no ids): for logs and tests.
        self.last_image_ids: dict[str, list[int]] = {}
        self._labeled_unit = labeled_per_step
        self._labeled = EpochBatches(
            "labeled",
            labeled_shard,
            labeled_per_step,
            seed=seed,
            start_epoch=starts["labeled_epoch"],
            shuffle_buffer_rows=shuffle_buffer_rows,
        )
        self._unlabeled = (
            None
            if unlabeled_shard is None
            else EpochBatches(
                "unlabeled",
                unlabeled_shard,
                unlabeled_per_step,
                seed=seed,
                start_epoch=starts["unlabeled_epoch"],
                shuffle_buffer_rows=shuffle_buffer_rows,
            )
        )

    def labeled(self, images: int | None = None) -> DetectionBatch:
        """``images`` labeled images (default ``labeled_per_step``), a multiple of it."""
        images = self._labeled_unit if images is None else images
        if images % self._labeled_unit:
            raise ValueError(
                f"a step cannot take {images} labeled images from a stream of "
                f"{self._labeled_unit}-image batches; make it a multiple of labeled_per_step"
            )
        samples = [
            sample
            for _ in range(images // self._labeled_unit)
            for sample in labeled_samples(self._labeled.next_batch())
        ]
        self.last_image_ids["labeled"] = [int(s.image_id) for s in samples]
        return collate_labeled(samples, self.device)

    def unlabeled(self) -> UnlabeledBatch:
        if self._unlabeled is None:
            raise RuntimeError("this run streams no unlabeled images (its method is supervised)")
        samples = unlabeled_samples(self._unlabeled.next_batch())
        self.last_image_ids["unlabeled"] = [int(s.image_id) for s in samples]
        return collate_unlabeled(samples, self.device)

    def position(self) -> dict[str, int]:
        """Epochs in progress and batches taken in them: what a checkpoint stores."""
        position = {
            "labeled_epoch": self._labeled.epoch,
            "labeled_batches_in_epoch": self._labeled.batches_in_epoch,
        }
        if self._unlabeled is not None:
            position["unlabeled_epoch"] = self._unlabeled.epoch
            position["unlabeled_batches_in_epoch"] = self._unlabeled.batches_in_epoch
        return position


def _start_epochs(start_epoch: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(start_epoch, Mapping):
        return {
            "labeled_epoch": int(start_epoch.get("labeled_epoch", 0)),
            "unlabeled_epoch": int(start_epoch.get("unlabeled_epoch", 0)),
        }
    return {"labeled_epoch": int(start_epoch), "unlabeled_epoch": int(start_epoch)}


def _nonnegative(seed: int) -> int:
    """numpy seeds and Ray's file shuffle take non-negative integers only."""
    return seed % (1 << 63)
