"""Image decoding errors name the file; streams cover each image once an epoch, reproducibly."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from softteacher.config import AugmentConfig, SyntheticConfig
from softteacher.data.coco import CocoDataset, load_coco
from softteacher.data.images import CorruptImageError, decode_image, load_image
from softteacher.data.samples import LabeledSample, UnlabeledSample
from softteacher.data.streams import (
    EmptyDatasetError,
    batched,
    labeled_stream,
    unlabeled_stream,
)
from softteacher.data.synthetic import generate_synthetic_coco

AUGMENT = AugmentConfig(train_sizes=(48, 72), max_size=144, test_size=64)


def _encoded(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def _gradient(height: int = 24, width: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 8, y * 10, np.full_like(x, 128)], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------- images


def test_png_decodes_exactly_to_rgb() -> None:
    pixels = _gradient()
    decoded = decode_image(_encoded(pixels, "PNG"), "a.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (24, 32, 3)
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_decodes_close_to_the_original() -> None:
    pixels = _gradient()
    decoded = decode_image(_encoded(pixels, "JPEG"), "a.jpg")
    assert decoded.dtype == np.uint8 and decoded.shape == (24, 32, 3)
    assert np.abs(decoded.astype(int) - pixels).mean() < 8


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"),
                                           ("CMYK", "JPEG"), ("P", "PNG")])
def test_other_modes_become_three_channels(mode: str, fmt: str) -> None:
    decoded = decode_image(_encoded(_gradient(), fmt, mode), f"a.{fmt.lower()}")
    assert decoded.dtype == np.uint8 and decoded.shape == (24, 32, 3)
    if mode == "L":
        assert (decoded[..., 0] == decoded[..., 1]).all()
        assert (decoded[..., 1] == decoded[..., 2]).all()


def test_exif_orientation_is_applied() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    Image.fromarray(_gradient(24, 32)).save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), "rotated.jpg").shape == (32, 24, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_names_the_file(tmp_path: Path, fmt: str) -> None:
    data = _encoded(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8), fmt)
    path = tmp_path / f"truncated.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=f"truncated.{fmt.lower()}") as info:
        load_image(path)
    assert "re-download" in str(info.value) and "\n" not in str(info.value)


def test_non_image_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image")
    with pytest.raises(CorruptImageError, match="notes.jpg"):
        load_image(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CorruptImageError, match="absent.jpg") as info:
        load_image(tmp_path / "absent.jpg")
    assert "\n" not in str(info.value)


def test_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    path.write_bytes(_encoded(_gradient(24, 32), "PNG"))
    assert load_image(path, expected_size=(32, 24)).shape == (24, 32, 3)
    with pytest.raises(CorruptImageError, match=r"small\.png is 32x24.*24x32"):
        load_image(path, expected_size=(24, 32))


# ---------------------------------------------------------------- streams


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    out_dir = tmp_path_factory.mktemp("synthetic")
    synthetic = generate_synthetic_coco(
        out_dir, SyntheticConfig(num_train=12, num_val=6, min_size=64, max_size=96, num_classes=4)
    )
    return load_coco(synthetic.train_ann, synthetic.train_images)


def _ids(samples: list[LabeledSample] | list[UnlabeledSample]) -> list[int]:
    return [sample.image_id for sample in samples]


def test_labeled_stream_covers_each_image_once_an_epoch(dataset: CocoDataset) -> None:
    n = len(dataset.records)
    samples = list(itertools.islice(labeled_stream(dataset, AUGMENT, seed=3), 3 * n))
    epochs = [_ids(samples[e * n : (e + 1) * n]) for e in range(3)]
    all_ids = sorted(record.image_id for record in dataset.records)
    assert all(sorted(epoch) == all_ids for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3, "each epoch must reshuffle"
    for sample in samples:
        assert isinstance(sample, LabeledSample)
        assert sample.image.dtype == np.uint8 and sample.image.ndim == 3
        assert sample.boxes.shape == (len(sample.labels), 4)


def test_labeled_stream_is_deterministic_for_a_seed(dataset: CocoDataset) -> None:
    n = len(dataset.records)
    first = list(itertools.islice(labeled_stream(dataset, AUGMENT, seed=5), n + 2))
    again = list(itertools.islice(labeled_stream(dataset, AUGMENT, seed=5), n + 2))
    other = list(itertools.islice(labeled_stream(dataset, AUGMENT, seed=6), n))
    assert _ids(first) == _ids(again)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert _ids(other) != _ids(first[:n])


def test_stream_does_not_reread_the_annotation_file(
    dataset: CocoDataset, tmp_path: Path
) -> None:
    moved = tmp_path / "moved.json"
    Path(dataset.ann_file).rename(moved)
    try:
        samples = list(itertools.islice(labeled_stream(dataset, AUGMENT, seed=0), 4))
    finally:
        moved.rename(dataset.ann_file)
    assert len(samples) == 4


def test_unlabeled_stream_carries_weak_and_strong_views(dataset: CocoDataset) -> None:
    n = len(dataset.records)
    samples = list(itertools.islice(unlabeled_stream(dataset, AUGMENT, seed=1), n))
    assert sorted(_ids(samples)) == sorted(record.image_id for record in dataset.records)
    for sample in samples:
        assert isinstance(sample, UnlabeledSample)
        for view in (sample.weak, sample.strong):
            assert view.image.dtype == np.uint8 and view.image.ndim == 3
            assert view.matrix.shape == (3, 3)
    first = list(itertools.islice(unlabeled_stream(dataset, AUGMENT, seed=1), 2))
    assert _ids(first) == _ids(samples[:2])
    np.testing.assert_array_equal(first[1].strong.image, samples[1].strong.image)


def test_stream_of_a_dataset_without_images_fails_at_once() -> None:
    empty = SimpleNamespace(records=[], ann_file=Path("empty.json"))
    with pytest.raises(EmptyDatasetError, match="empty.json"):
        labeled_stream(empty, AUGMENT, seed=0)
    with pytest.raises(EmptyDatasetError, match="empty.json"):
        unlabeled_stream(empty, AUGMENT, seed=0)


def test_batched_sizes() -> None:
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(iter(range(4)), 1)) == [[0], [1], [2], [3]]
    assert list(batched(iter([]), 2)) == []
    endless = batched(itertools.count(), 5)
    assert [next(endless) for _ in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="at least 1"):
        batched(iter(range(3)), 0)


def test_batched_labeled_stream_as_the_trainer_calls_it(dataset: CocoDataset) -> None:
    batches = batched(labeled_stream(dataset, AUGMENT, seed=0), 2)
    first, second = next(batches), next(batches)
    assert len(first) == len(second) == 2
    assert all(isinstance(sample, LabeledSample) for sample in first + second)
