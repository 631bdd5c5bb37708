"""Infinite, seeded streams of augmented samples in a single process.

The reference data path for tests and single-process runs: Ray Data replaces it in the
platform, so it stays small. An epoch's order and augmentations depend only on
``(seed, epoch)``, so a run can be reproduced image for image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

from softteacher.config import AugmentConfig
from softteacher.data.coco import CocoDataset
from softteacher.data.images import load_image
from softteacher.data.samples import ImageRecord, LabeledSample, UnlabeledSample
from softteacher.data.transforms import labeled_sample, unlabeled_sample

T = TypeVar("T")
Sample = TypeVar("Sample")


class EmptyDatasetError(ValueError):
    """A stream was asked of a dataset without images: it would never yield."""


def labeled_stream(
    dataset: CocoDataset, cfg: AugmentConfig, seed: int
) -> Iterator[LabeledSample]:
    """Labeled samples forever, every image once an epoch, reshuffled each epoch."""
    _require_images(dataset)
    return _epochs(dataset, cfg, seed, labeled_sample)


def unlabeled_stream(
    dataset: CocoDataset, cfg: AugmentConfig, seed: int
) -> Iterator[UnlabeledSample]:
    """Unlabeled samples (weak and strong views of one image) forever, reshuffled each epoch."""
    _require_images(dataset)
    return _epochs(dataset, cfg, seed, unlabeled_sample)


def batched(stream: Iterator[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items; a finite stream's last list may be shorter."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return _batches(iter(stream), size)


def _batches(iterator: Iterator[T], size: int) -> Iterator[list[T]]:
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _epochs(
    dataset: CocoDataset,
    cfg: AugmentConfig,
    seed: int,
    make_sample: Callable[[ImageRecord, np.ndarray, AugmentConfig, np.random.Generator], Sample],
) -> Iterator[Sample]:
    """Shuffle, decode and augment; one generator seeded from ``(seed, epoch)`` an epoch."""
    records = dataset.records
    for epoch in itertools.count():
        rng = np.random.default_rng((seed, epoch))
        for index in rng.permutation(len(records)):
            record = records[index]
            image = load_image(dataset.image_path(record), (record.width, record.height))
            yield make_sample(record, image, cfg, rng)


def _require_images(dataset: CocoDataset) -> None:
    """Fail at the call, not at the first ``next``, since an empty stream would hang a loop."""
    if not dataset.records:
        raise EmptyDatasetError(
            f"annotation file {dataset.ann_file} has no usable images; "
            "check the file and the image root"
        )
