"""Image decoding errors name the file; a stream's rows cover each image once an epoch, are a
pure function of (seed, position), split exactly between workers and resume mid-epoch."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softteacher.config import AugmentConfig
from softteacher.data.images import CorruptImageError, decode_image, load_image
from softteacher.data.rows import StreamPlan, labeled_samples, unlabeled_samples
from softteacher.data.shards import EmptyDatasetError
from softteacher.data.steps import LocalRowStream, StepBatches

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


def _ids(plan: StreamPlan, positions) -> list[int]:
    return plan.locate(np.asarray(positions))[1].tolist()


def test_each_epoch_visits_every_image_once_in_a_new_order() -> None:
    plan = StreamPlan("labeled", 7, seed=3)
    epochs, rows = plan.locate(np.arange(21))
    assert epochs.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    orders = [tuple(rows[e * 7 : (e + 1) * 7]) for e in range(3)]
    assert all(sorted(order) == list(range(7)) for order in orders)
    assert len(set(orders)) == 3, "each epoch must reshuffle"


def test_the_order_is_a_function_of_seed_and_stream_only() -> None:
    labeled = _ids(StreamPlan("labeled", 9, 5), range(20))
    assert _ids(StreamPlan("labeled", 9, 5), range(20)) == labeled
    assert _ids(StreamPlan("labeled", 9, 6), range(9)) != labeled[:9]
    assert _ids(StreamPlan("unlabeled", 9, 5), range(9)) != labeled[:9]


def test_workers_split_the_global_order_exactly() -> None:
    """Worker r of 3 takes global positions r, r + 3, ...: together, the one-worker order."""
    single = _ids(StreamPlan("unlabeled", 10, 1), range(30))
    ranks = [_ids(StreamPlan("unlabeled", 10, 1, rank, 3), range(10)) for rank in range(3)]
    interleaved = [ranks[i % 3][i // 3] for i in range(30)]
    assert interleaved == single


def test_an_empty_stream_or_a_bad_rank_fails_at_once() -> None:
    with pytest.raises(EmptyDatasetError, match="labeled stream has no images"):
        StreamPlan("labeled", 0, 0)
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        StreamPlan("labeled", 4, 0, rank=2, world_size=2)


def test_local_rows_are_reproducible_and_resume_mid_epoch(smoke_fold) -> None:
    shards = smoke_fold.labeled
    plan = StreamPlan("labeled", shards.num_rows, seed=0)
    n = shards.num_rows
    whole = LocalRowStream(shards, plan, AUGMENT).take(2 * n + 1)
    assert LocalRowStream(shards, plan, AUGMENT).take(2 * n + 1).equals(whole)
    resumed = LocalRowStream(shards, plan, AUGMENT, start=n + 1)
    assert resumed.take(n).equals(whole.slice(n + 1, n)) and resumed.position == 2 * n + 1
    samples = labeled_samples(whole)
    assert sorted(s.image_id for s in samples[:n]) == sorted(s.image_id for s in samples[n:2 * n])
    for sample in samples:
        assert sample.image.dtype == np.uint8 and sample.image.ndim == 3
        assert sample.boxes.shape == (len(sample.labels), 4)


def test_unlabeled_rows_carry_weak_and_strong_views_and_steps_count_positions(smoke_fold) -> None:
    shards = smoke_fold.unlabeled
    plan = StreamPlan("unlabeled", shards.num_rows, seed=1)
    for sample in unlabeled_samples(LocalRowStream(shards, plan, AUGMENT).take(3)):
        for view in (sample.weak, sample.strong):
            assert view.image.dtype == np.uint8 and view.image.ndim == 3
            assert view.matrix.shape == (3, 3)
    labeled_plan = StreamPlan("labeled", smoke_fold.labeled.num_rows, seed=1)
    steps = StepBatches(
        LocalRowStream(smoke_fold.labeled, labeled_plan, AUGMENT),
        LocalRowStream(shards, plan, AUGMENT, start=7),
        "cpu",
    )
    labeled, unlabeled = steps.labeled(5), steps.unlabeled(4)
    assert len(labeled.images) == 5 and len(unlabeled.weak) == len(unlabeled.strong) == 4
    assert steps.position() == {"labeled_rows": 5, "unlabeled_rows": 11}


def test_step_batches_close_both_streams_however_the_run_ends(smoke_fold) -> None:
    """``with StepBatches(...)`` around a run: a step that raises still closes each stream,
    so a Ray stream's actors never outlive the run that used them."""

    class Recorded(LocalRowStream):
        closed = 0

        def close(self) -> None:
            self.closed += 1

    labeled_plan = StreamPlan("labeled", smoke_fold.labeled.num_rows, seed=1)
    unlabeled_plan = StreamPlan("unlabeled", smoke_fold.unlabeled.num_rows, seed=1)
    labeled = Recorded(smoke_fold.labeled, labeled_plan, AUGMENT)
    unlabeled = Recorded(smoke_fold.unlabeled, unlabeled_plan, AUGMENT)
    with pytest.raises(FloatingPointError), StepBatches(labeled, unlabeled, "cpu") as steps:
        steps.labeled(2)
        raise FloatingPointError("the step's loss was NaN")
    assert (labeled.closed, unlabeled.closed) == (1, 1)
