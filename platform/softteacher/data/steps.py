"""A training step's images: rows taken from the labeled and unlabeled streams, collated.

A ``RowStream`` hands out a stream's rows in order and knows its position (rows handed
out). ``LocalRowStream`` makes them in this process; ``ray_stream.RayRowStream`` has Ray
Data actors make them. Both build rows with ``rows.AugmentedRows``, so they yield the same
rows for the same plan, and ``StepBatches`` is the one place rows become tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import pyarrow as pa
import torch

from softteacher.config import AugmentConfig
from softteacher.data.collate import (
    DetectionBatch,
    UnlabeledBatch,
    collate_labeled,
    collate_unlabeled,
)
from softteacher.data.rows import AugmentedRows, StreamPlan, labeled_samples, unlabeled_samples
from softteacher.data.shards import ShardSet

# The keys of a data position in a checkpoint: rows each stream has handed out.
POSITION_KEYS = {"labeled": "labeled_rows", "unlabeled": "unlabeled_rows"}


class RowStream(Protocol):
    """A stream's rows in order; ``position`` is how many it has handed out; ``close``
    stops whatever makes rows ahead of the taker."""

    position: int

    def take(self, n: int) -> pa.Table: ...

    def close(self) -> object: ...


class LocalRowStream:
    """Rows made in this process on demand: the debugging and benchmark path."""

    def __init__(
        self, shards: ShardSet, plan: StreamPlan, cfg: AugmentConfig, *, start: int = 0
    ) -> None:
        self._rows = AugmentedRows(shards, plan, cfg)
        self.position = start

    def take(self, n: int) -> pa.Table:
        table = self._rows.rows(self.position, self.position + n)
        self.position += n
        return table

    def close(self) -> None:
        """Rows are made on demand in the taker's thread: nothing runs ahead to stop."""


class StepBatches:
    """One worker's step data: ``labeled(images)`` and ``unlabeled(images)`` on demand.

    A stream that is never asked for never starts (a supervised run has no unlabeled one).
    ``position()`` is the data position to checkpoint: resuming from it continues each
    stream at the exact row it stopped at. Used as a context manager, it closes its streams
    however the run ends.
    """

    def __init__(
        self,
        labeled: RowStream,
        unlabeled: RowStream | None,
        device: torch.device | str,
    ) -> None:
        self.device = torch.device(device)
        # Which images the last batches used (DetectionBatch carries no ids): for logs and tests.
        self.last_image_ids: dict[str, list[int]] = {}
        self._labeled = labeled
        self._unlabeled = unlabeled

    def labeled(self, images: int) -> DetectionBatch:
        samples = labeled_samples(self._labeled.take(images))
        self.last_image_ids["labeled"] = [int(s.image_id) for s in samples]
        return collate_labeled(samples, self.device)

    def unlabeled(self, images: int) -> UnlabeledBatch:
        if self._unlabeled is None:
            raise RuntimeError("this run streams no unlabeled images (its method is supervised)")
        samples = unlabeled_samples(self._unlabeled.take(images))
        self.last_image_ids["unlabeled"] = [int(s.image_id) for s in samples]
        return collate_unlabeled(samples, self.device)

    def close(self) -> None:
        for stream in (self._labeled, self._unlabeled):
            if stream is not None:
                stream.close()

    def __enter__(self) -> StepBatches:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def position(self) -> dict[str, int]:
        """Rows handed out by each stream: what a checkpoint stores."""
        position = {POSITION_KEYS["labeled"]: self._labeled.position}
        if self._unlabeled is not None:
            position[POSITION_KEYS["unlabeled"]] = self._unlabeled.position
        return position


def start_positions(position: Mapping[str, int] | None) -> dict[str, int]:
    """Where each stream starts: a checkpoint's data position, or 0 for a fresh run."""
    position = position or {}
    return {stream: int(position.get(key, 0)) for stream, key in POSITION_KEYS.items()}
