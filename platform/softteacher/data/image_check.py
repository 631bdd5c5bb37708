"""Every image of a set decoded once before training: a bad file is known before the first
step, not at image 117,000 of a multi-day run, and each image's real size is known.

A set is checked once: a shard set is cached by content (a cached set is not checked
again), a val set leaves a marker keyed by its content (:func:`check_val_images`). Within
one process an image's outcome is remembered by (path, size, mtime_ns), so the folds of a
sweep, which share their images, decode each image once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from softteacher.data.coco import CocoDataset
from softteacher.data.images import CorruptImageError, check_image_file
from softteacher.data.samples import ImageRecord
from softteacher.files import write_atomically

# Fewer images are checked in this process: a pool's start costs more than it saves.
PARALLEL_FROM = 256
# A larger set prints a progress line every ~10% (COCO train2017 takes minutes).
PROGRESS_FROM = 4000
# How many file names an error or warning line lists.
NAMES_SHOWN = 3

Outcome = tuple[int, int] | str  # the real (width, height), or why the image does not decode
_outcomes: dict[tuple[str, int, int], Outcome] = {}


@dataclass(frozen=True)
class SetCheck:
    """A set's images checked: per record its real ``(width, height)`` (None: bad), the
    undecodable ones as ``(file_name, message)``, and the ones whose real size is not the
    annotated one as ``(file_name, real, annotated)``."""

    sizes: tuple[tuple[int, int] | None, ...]
    bad: tuple[tuple[str, str], ...]
    resized: tuple[tuple[str, tuple[int, int], tuple[int, int]], ...]

    def resized_line(self, what: str, ann_file: Path) -> str:
        """``N of M <what> in <ann_file> are not the size their annotation says (first: ...)``."""
        name, (width, height), (ann_width, ann_height) = self.resized[0]
        return (
            f"{len(self.resized)} of {len(self.sizes)} {what} in {ann_file} are not the size their "
            f"annotation says (first: {name} is {width}x{height} (WxH), the annotation says "
            f"{ann_width}x{ann_height})"
        )


def image_stat(path: Path, ann_file: Path) -> tuple[int, int]:
    """The image file's (size, mtime_ns); a missing or unreadable file is an error at once
    (most likely a wrong image root: leaving such images out would hide it). An empty file
    is a bad image, for :func:`check_images` to find."""
    try:
        stat = path.stat()
    except OSError as error:
        raise CorruptImageError(
            f"image {path} listed in {ann_file} cannot be read "
            f"({error.strerror or type(error).__name__}); check the image root or remove "
            "the image from the annotation file"
        ) from None
    return stat.st_size, stat.st_mtime_ns


def check_records(
    records: Sequence[ImageRecord],
    paths: Sequence[Path],
    stats: Sequence[tuple[int, int]],
    what: str,
) -> SetCheck:
    """Decode each record's image once (:func:`check_images`) and compare its real size with
    the record's; ``what`` names the set in the progress lines."""
    outcomes = check_images(paths, stats, what)
    sizes, bad, resized = [], [], []
    for record, outcome in zip(records, outcomes, strict=True):
        if isinstance(outcome, str):
            sizes.append(None)
            bad.append((record.file_name, outcome))
            continue
        sizes.append(outcome)
        if outcome != (record.width, record.height):
            resized.append((record.file_name, outcome, (record.width, record.height)))
    return SetCheck(tuple(sizes), tuple(bad), tuple(resized))


def check_images(
    paths: Sequence[Path], stats: Sequence[tuple[int, int]], what: str
) -> list[Outcome]:
    """Each image's real ``(width, height)`` or its one-line error, in order: a process pool
    of ``os.cpu_count()`` workers for many images, a line ``checking images of <what>: i/n``
    every ~10% for a large set; an image already checked in this process (same path, size
    and mtime) is not decoded again."""
    keys = [(str(path), *stat) for path, stat in zip(paths, stats, strict=True)]
    todo = [key for key in dict.fromkeys(keys) if key not in _outcomes]
    for key, outcome in zip(todo, _decode_all([key[0] for key in todo], what), strict=True):
        _outcomes[key] = outcome
    return [_outcomes[key] for key in keys]


def _decode_all(files: list[str], what: str) -> list[Outcome]:
    total = len(files)
    every = -(-total // 10) if total >= PROGRESS_FROM else 0
    workers = os.cpu_count() or 1
    results: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        if total >= PARALLEL_FROM and workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=_context())
            # on an error or Ctrl-C, drop the queued chunks instead of decoding them all first
            stack.callback(pool.shutdown, cancel_futures=True)
            chunk = max(1, min(64, total // (workers * 4)))
            outcomes = pool.map(check_image_file, files, chunksize=chunk)
        else:
            outcomes = map(check_image_file, files)
        for index, outcome in enumerate(outcomes, start=1):
            results.append(outcome)
            if every and (index % every == 0 or index == total):
                print(f"checking images of {what}: {index}/{total}", flush=True)
    return results


def _context() -> multiprocessing.context.BaseContext | None:
    """forkserver where there is one: the driver may hold Ray's and torch's threads, which a
    plain fork would copy mid-lock; forkserver imports the main module once, not per worker."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return None


def first_names(items: Sequence[tuple[str, ...]]) -> str:
    """``a.jpg, b.jpg, c.jpg and 5 more``: the first items' file names."""
    names = ", ".join(item[0] for item in items[:NAMES_SHOWN])
    return names + (f" and {len(items) - NAMES_SHOWN} more" if len(items) > NAMES_SHOWN else "")


def check_val_images(val: CocoDataset, marker_dir: Path, ann_digest: str) -> None:
    """Raise :class:`CorruptImageError` unless every val image decodes and is the size its
    annotation says (evaluation reads them from disk, checking the size); checked once.

    A bad val image is always an error, never left out: that would change the benchmark.
    The outcome is a marker in ``marker_dir`` keyed by ``ann_digest`` (the annotation
    file's), the image root and the images' (size, mtime_ns), so a second sweep over the
    same val set decodes nothing.
    """
    paths = [val.image_path(record) for record in val.records]
    stats = [image_stat(path, val.ann_file) for path in paths]
    digest = hashlib.sha256(f"{ann_digest}\0{val.image_root}".encode())
    for size, mtime_ns in stats:
        digest.update(struct.pack("<qq", size, mtime_ns))
    marker = Path(marker_dir) / f"{digest.hexdigest()[:20]}.json"
    if marker.is_file():
        return
    checked = check_records(val.records, paths, stats, val.ann_file.name)
    total = len(val.records)
    if checked.bad:
        raise CorruptImageError(
            f"{len(checked.bad)} of {total} val images in {val.ann_file} cannot be decoded: "
            f"{first_names(checked.bad)} (first: {checked.bad[0][1]}); re-download them or "
            "remove them from the annotation file (val images are never left out: that "
            "would change the benchmark)"
        )
    if checked.resized:
        raise CorruptImageError(
            f"{checked.resized_line('val images', val.ann_file)}; fix width/height in the "
            "annotation file or replace the images"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps({"ann_file": str(val.ann_file), "num_images": total}))
