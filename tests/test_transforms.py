"""The views' recorded matrices against the pixels they claim to describe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from softteacher.config import AugmentConfig, ExperimentConfig
from softteacher.data import transforms as T
from softteacher.data.samples import ImageRecord, View
from softteacher.presets import preset

BACKGROUND = (40, 40, 40)
OBJECT = (250, 30, 30)
FILL = 125
HEIGHT, WIDTH = 120, 160
# An off-centre rectangle so that a wrong rotation direction or a wrong shear axis shows.
RECT = np.array([[30.0, 20.0, 70.0, 50.0]])
DISC_CENTRE, DISC_RADIUS = (110.0, 75.0), 18.0

SMALL = AugmentConfig(train_sizes=(80, 140), max_size=200, test_size=100)
SHARED = dataclasses.replace(SMALL, shared_resize_flip=True)


def canvas() -> np.ndarray:
    image = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    return image


def rectangle_image() -> tuple[np.ndarray, np.ndarray]:
    image = canvas()
    x1, y1, x2, y2 = RECT[0].astype(int)
    image[y1:y2, x1:x2] = OBJECT
    return image, RECT


def disc_image() -> tuple[np.ndarray, np.ndarray]:
    image = canvas()
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    cx, cy = DISC_CENTRE
    image[(xs - cx) ** 2 + (ys - cy) ** 2 <= DISC_RADIUS**2] = OBJECT
    box = np.array([[cx - DISC_RADIUS, cy - DISC_RADIUS, cx + DISC_RADIUS, cy + DISC_RADIUS]])
    return image, box


def object_box(image: np.ndarray) -> np.ndarray:
    """Tight box (pixel edges) of the pixels that are mostly the object's colour."""
    red, green = image[..., 0].astype(int), image[..., 1].astype(int)
    mask = (red > 145) & (green < 90)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, "object vanished from the view"
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


GEOMETRIC = {
    "flip": lambda im: T._hflip(im),
    "resize_up": lambda im: T._resize(im, 230, 170),
    "resize_down": lambda im: T._resize(im, 97, 61),
    "translate": lambda im: T._translate(im, 17.3, -11.6, FILL),
    "rotate": lambda im: T._rotate(im, 25.0, FILL),
    "rotate_neg": lambda im: T._rotate(im, -30.0, FILL),
    "shear_x": lambda im: T._shear(im, 20.0, "x", FILL),
    "shear_y": lambda im: T._shear(im, -25.0, "y", FILL),
}


@pytest.mark.parametrize("op", sorted(GEOMETRIC))
def test_rectangle_box_follows_its_pixels(op):
    image, box = rectangle_image()
    out, matrix = GEOMETRIC[op](image)
    mapped = T.map_boxes(box, matrix, out.shape[1], out.shape[0])[0]
    # The rectangle's corners are its extremes, so even rotate/shear give a tight box.
    assert iou(mapped, object_box(out)) > 0.9, (mapped, object_box(out))


@pytest.mark.parametrize("op", sorted(GEOMETRIC))
def test_disc_box_encloses_its_pixels(op):
    image, box = disc_image()
    out, matrix = GEOMETRIC[op](image)
    mapped = T.map_boxes(box, matrix, out.shape[1], out.shape[0])[0]
    pixels = object_box(out)
    assert (pixels[:2] >= mapped[:2] - 1.5).all() and (pixels[2:] <= mapped[2:] + 1.5).all(), (
        mapped,
        pixels,
    )
    if op in ("flip", "resize_up", "resize_down", "translate"):
        assert iou(mapped, pixels) > 0.9, (mapped, pixels)


def test_geometric_ops_keep_the_canvas_and_fill_exposed_pixels():
    image, _ = rectangle_image()
    for name in ("translate", "rotate", "shear_x"):
        out, _ = GEOMETRIC[name](image)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert (out == FILL).all(axis=2).any(), name
    translated, _ = T._translate(image, 10.0, 0.0, FILL)
    assert (translated[:, :10] == FILL).all()


def test_rotate_and_shear_act_about_the_centre():
    image, _ = rectangle_image()
    centre = np.array([WIDTH / 2, HEIGHT / 2, 1.0])
    for name in ("rotate", "rotate_neg", "shear_x", "shear_y"):
        _, matrix = GEOMETRIC[name](image)
        np.testing.assert_allclose(matrix @ centre, centre, err_msg=name)
    # Positive degrees turn counter-clockwise on screen (y down): right of centre moves up.
    _, matrix = T._rotate(image, 30.0, FILL)
    right = matrix @ (centre + [10.0, 0.0, 0.0])
    assert right[1] < centre[1] - 4


def test_map_boxes_clips_to_the_image():
    shifted = np.array([[1, 0, 100], [0, 1, -30], [0, 0, 1]], dtype=np.float64)
    mapped = T.map_boxes(np.array([[80.0, 10.0, 120.0, 50.0]]), shifted, WIDTH, HEIGHT)
    np.testing.assert_allclose(mapped, [[160.0, 0.0, 160.0, 20.0]])
    assert mapped.dtype == np.float32
    assert T.map_boxes(np.zeros((0, 4)), np.eye(3), WIDTH, HEIGHT).shape == (0, 4)


def forced_views(second_op) -> tuple[View, View]:
    """A weak view (resize + flip) and a strong one that adds ``second_op`` on top of it."""
    image, _ = rectangle_image()
    resized, resize = T._resize(image, 200, 150)
    flipped, flip = T._hflip(resized)
    weak = View(flipped, flip @ resize)
    moved, extra = second_op(flipped)
    return weak, View(moved, extra @ weak.matrix)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float32)


@pytest.mark.parametrize("seed", range(6))
def test_transfer_equals_mapping_the_original_straight_into_the_strong_view(seed):
    image, _ = rectangle_image()
    weak, strong = T.weak_strong_views(image, SMALL, np.random.default_rng(seed))
    box = np.array([[50.0, 40.0, 100.0, 80.0], [60.0, 30.0, 75.0, 90.0]])
    in_weak = T.map_boxes(box, weak.matrix, weak.image.shape[1], weak.image.shape[0])
    height, width = strong.image.shape[:2]
    transferred = T.transfer_boxes(
        as_tensor(in_weak), as_tensor(weak.matrix), as_tensor(strong.matrix), (height, width)
    )
    assert transferred.dtype == torch.float32
    direct = T.map_boxes(box, strong.matrix, width, height)
    np.testing.assert_allclose(transferred.numpy(), direct, atol=1e-3)


@pytest.mark.parametrize(
    "second_op",
    [
        lambda im: T._translate(im, 12.5, -7.25, FILL),
        lambda im: T._hflip(im),
        lambda im: T._resize(im, 260, 180),
    ],
    ids=["translate", "flip", "resize"],
)
def test_transfer_round_trip_is_identity(second_op):
    weak, strong = forced_views(second_op)
    box = torch.tensor([[60.0, 40.0, 110.0, 90.0], [20.0, 30.0, 45.0, 70.0]])
    weak_size, strong_size = weak.image.shape[:2], strong.image.shape[:2]
    there = T.transfer_boxes(box, as_tensor(weak.matrix), as_tensor(strong.matrix), strong_size)
    assert not torch.allclose(there, box)
    back = T.transfer_boxes(there, as_tensor(strong.matrix), as_tensor(weak.matrix), weak_size)
    torch.testing.assert_close(back, box, atol=1e-3, rtol=0)


def test_transfer_into_the_strong_view_matches_the_pixels():
    """A teacher box on the weak view lands on the object in the rotated strong view."""
    weak, strong = forced_views(lambda im: T._rotate(im, 20.0, FILL))
    weak_box = as_tensor(object_box(weak.image)[None])
    moved = T.transfer_boxes(
        weak_box, as_tensor(weak.matrix), as_tensor(strong.matrix), strong.image.shape[:2]
    )
    assert iou(moved[0].numpy(), object_box(strong.image)) > 0.85


def test_same_seed_same_views():
    image, _ = rectangle_image()
    first = T.weak_strong_views(image, SMALL, np.random.default_rng(7))
    second = T.weak_strong_views(image, SMALL, np.random.default_rng(7))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.matrix, b.matrix)
    other = T.weak_strong_views(image, SMALL, np.random.default_rng(8))
    assert not np.array_equal(first[1].matrix, other[1].matrix)


def resize_flip_signature(view: View) -> tuple[tuple[int, ...], float]:
    """The view's size and the determinant of its linear part: the translate, rotate or shear
    of a strong view has determinant 1, so this is +-(x scale * y scale), negative if flipped."""
    return view.image.shape, float(np.linalg.det(view.matrix[:2, :2]))


def test_weak_and_strong_draw_resize_and_flip_independently():
    image, _ = rectangle_image()
    differ = 0
    for seed in range(12):
        weak, strong = T.weak_strong_views(image, SMALL, np.random.default_rng(seed))
        # The weak view's draws, then a whole strong view's from the same generator.
        rng = np.random.default_rng(seed)
        np.testing.assert_array_equal(weak.image, T.weak_view(image, SMALL, rng).image)
        np.testing.assert_array_equal(strong.image, T.strong_view(image, SMALL, rng).image)
        (weak_shape, weak_det), (strong_shape, strong_det) = map(
            resize_flip_signature, (weak, strong)
        )
        differ += weak_shape != strong_shape or np.sign(weak_det) != np.sign(strong_det)
    assert differ >= 6  # 61 sizes and a fair flip each: nearly every seed differs


@pytest.mark.parametrize("seed", range(8))
def test_weak_and_strong_share_resize_and_flip_when_asked(seed):
    image, _ = rectangle_image()
    weak, strong = T.weak_strong_views(image, SHARED, np.random.default_rng(seed))
    (weak_shape, weak_det), (strong_shape, strong_det) = map(resize_flip_signature, (weak, strong))
    assert weak_shape == strong_shape and strong_det == pytest.approx(weak_det)
    # Same draw order as the single-view functions.
    np.testing.assert_array_equal(
        weak.matrix, T.weak_view(image, SHARED, np.random.default_rng(seed)).matrix
    )
    np.testing.assert_array_equal(
        strong.image, T.strong_view(image, SHARED, np.random.default_rng(seed)).image
    )
    # strong @ inv(weak) is one translate, rotation or shear: determinant 1, no resize or flip left.
    between = strong.matrix @ np.linalg.inv(weak.matrix)
    linear = between[:2, :2]
    assert np.linalg.det(linear) == pytest.approx(1.0)
    is_translate = np.allclose(linear, np.eye(2))
    is_rotation = np.allclose(linear @ linear.T, np.eye(2))
    is_shear = (
        np.allclose(np.diag(linear), 1.0) and min(abs(linear[0, 1]), abs(linear[1, 0])) < 1e-12
    )
    assert is_translate or is_rotation or is_shear, between


def test_weak_view_size_range_and_flip_probability():
    image, _ = rectangle_image()
    never = AugmentConfig(train_sizes=(80, 140), max_size=1000, flip_prob=0.0)
    always = AugmentConfig(train_sizes=(80, 140), max_size=1000, flip_prob=1.0)
    shorts = set()
    for seed in range(30):
        view = T.weak_view(image, never, np.random.default_rng(seed))
        short = min(view.image.shape[:2])
        assert 80 <= short <= 140
        shorts.add(short)
        assert view.matrix[0, 0] > 0
        assert T.weak_view(image, always, np.random.default_rng(seed)).matrix[0, 0] < 0
    assert len(shorts) > 10
    capped = AugmentConfig(train_sizes=(200, 200), max_size=220)
    assert max(T.weak_view(image, capped, np.random.default_rng(0)).image.shape[:2]) == 220


@pytest.mark.parametrize("op", T.COLOUR_OPS)
@pytest.mark.parametrize("magnitude", [1, 10])
def test_colour_ops_keep_shape_and_dtype(op, magnitude):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = T._colour(image, op, magnitude)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_colour_magnitudes_do_what_the_docstring_says():
    image = np.random.default_rng(0).integers(30, 200, (40, 50, 3), dtype=np.uint8)
    mean = image.mean()
    assert T._colour(image, "brightness", 1).mean() < 0.5 * mean  # factor 0.28
    assert T._colour(image, "brightness", 10).mean() > 1.5 * mean  # factor 1.9
    np.testing.assert_array_equal(T._colour(image, "solarize", 10), 255 - image)
    assert (T._colour(image, "posterize", 10) % 16 == 0).all()
    assert (T._colour(image, "posterize", 1) % 2 == 0).all()
    with pytest.raises(ValueError, match="unknown colour op"):
        T._colour(image, "hue", 5)


def test_every_colour_op_and_magnitude_is_reachable():
    rng = np.random.default_rng(0)
    draws = [T._sample_colour_op(SMALL, rng) for _ in range(600)]
    assert {op for op, _ in draws} == set(T.COLOUR_OPS)
    assert {m for _, m in draws} == set(range(1, 11))


def test_every_geometric_op_is_reachable():
    image, _ = rectangle_image()
    view = View(image, np.eye(3))
    rng = np.random.default_rng(0)
    assert {T._random_geometric(view, SMALL, rng)[1] for _ in range(40)} == set(T.GEOMETRIC_OPS)


def test_cutout_changes_pixels_not_the_matrix():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    matrix = np.diag([2.0, 2.0, 1.0])
    out = T._random_cutout(View(image, matrix), SMALL, np.random.default_rng(3))
    np.testing.assert_array_equal(out.matrix, matrix)
    changed = (out.image != 0).any(axis=2)
    assert changed.any()
    assert (out.image[changed] == FILL).all()
    # At most 4 squares of side <= 20 px (20% of the short side 100).
    assert changed.sum() <= 4 * 20 * 20
    np.testing.assert_array_equal(image, 0)  # input untouched


def test_labeled_sample_drops_boxes_that_leave_and_keeps_labels_aligned():
    image, _ = rectangle_image()
    boxes = np.array(
        [[10.0, 10.0, 60.0, 50.0], [100.0, 60.0, 150.0, 110.0], [0.0, 0.0, 0.0, 30.0]],
        dtype=np.float32,
    )
    record = ImageRecord(
        image_id=3,
        file_name="a.jpg",
        width=WIDTH,
        height=HEIGHT,
        boxes=boxes,
        labels=np.array([1, 2, 3]),
    )
    cfg = AugmentConfig(train_sizes=(120, 120), max_size=400, flip_prob=1.0, labeled_view="weak")
    sample = T.labeled_sample(record, image, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(sample.labels, [1, 2])  # the zero-width box is dropped
    np.testing.assert_allclose(
        sample.boxes, [[100.0, 10.0, 150.0, 50.0], [10.0, 60.0, 60.0, 110.0]], atol=1e-4
    )
    assert sample.image_id == 3 and sample.boxes.dtype == np.float32

    # A translation that pushes the second box fully off the canvas drops it with its label.
    pushed = T.map_boxes(boxes[:2], np.array([[1, 0, -100], [0, 1, 0], [0, 0, 1.0]]), WIDTH, HEIGHT)
    assert pushed[0, 2] - pushed[0, 0] < 1 and pushed[1, 2] - pushed[1, 0] >= 1


def test_paper_labeled_view_is_resize_flip_and_one_colour_op():
    """Both references: no geometric op and no cutout on labeled images, one colour op."""
    image, _ = rectangle_image()
    boxes = np.array([[10.0, 10.0, 60.0, 50.0], [100.0, 60.0, 150.0, 110.0]], dtype=np.float32)
    record = ImageRecord(4, "e.jpg", WIDTH, HEIGHT, boxes, np.array([1, 2]))
    # Short side 120 -> 60 (scale 0.5, 80 x 60), then always flipped: x -> 80 - x.
    cfg = AugmentConfig(train_sizes=(60, 60), max_size=400, flip_prob=1.0)
    assert cfg.labeled_view == "colour"
    hand = np.array([[-0.5, 0.0, 80.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    recoloured = 0
    for seed in range(10):
        sample = T.labeled_sample(record, image, cfg, np.random.default_rng(seed))
        np.testing.assert_allclose(
            sample.boxes, [[50.0, 5.0, 75.0, 25.0], [5.0, 30.0, 30.0, 55.0]], atol=1e-4
        )
        view = T.colour_view(image, cfg, np.random.default_rng(seed))
        np.testing.assert_allclose(view.matrix, hand)
        np.testing.assert_array_equal(view.image, sample.image)
        # Exactly the drawn colour op on the resized, flipped image: nothing else touched it.
        rng = np.random.default_rng(seed)
        plain = T.weak_view(image, cfg, rng).image
        op, magnitude = T._sample_colour_op(cfg, rng)
        np.testing.assert_array_equal(sample.image, T._colour(plain, op, magnitude))
        recoloured += not np.array_equal(sample.image, plain)
    assert recoloured > 0


def test_presets_labeled_view_and_resize_flip_draws():
    for config in (ExperimentConfig(), preset("paper")):
        assert config.augment.labeled_view == "colour"
        assert not config.augment.shared_resize_flip
    for name in ("cpu", "bench", "smoke"):
        assert preset(name).augment.labeled_view == "weak"
    with pytest.raises(ValueError, match="augment.labeled_view"):
        AugmentConfig(labeled_view="cutout")


def test_strong_labeled_sample_boxes_stay_inside_the_view():
    image, _ = rectangle_image()
    record = ImageRecord(1, "b.jpg", WIDTH, HEIGHT, RECT.astype(np.float32), np.array([5]))
    strong = dataclasses.replace(SMALL, labeled_view="strong")
    for seed in range(10):
        sample = T.labeled_sample(record, image, strong, np.random.default_rng(seed))
        assert len(sample.boxes) == len(sample.labels)
        height, width = sample.image.shape[:2]
        assert (sample.boxes[:, [0, 2]] <= width).all() and (
            sample.boxes[:, [1, 3]] <= height
        ).all()
        assert (sample.boxes >= 0).all()


def test_labeled_sample_rejects_a_size_mismatch():
    image, _ = rectangle_image()
    record = ImageRecord(1, "c.jpg", WIDTH + 1, HEIGHT, RECT.astype(np.float32), np.array([1]))
    with pytest.raises(T.ImageFormatError, match="c.jpg"):
        T.labeled_sample(record, image, SMALL, np.random.default_rng(0))


def test_unlabeled_sample_carries_both_views():
    image, _ = rectangle_image()
    record = ImageRecord(
        9, "d.jpg", WIDTH, HEIGHT, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    )
    sample = T.unlabeled_sample(record, image, SMALL, np.random.default_rng(0))
    weak, strong = T.weak_strong_views(image, SMALL, np.random.default_rng(0))
    assert sample.image_id == 9
    np.testing.assert_array_equal(sample.weak.image, weak.image)
    np.testing.assert_array_equal(sample.strong.image, strong.image)


def test_resize_for_test_scale_shape_and_cap():
    image = np.zeros((300, 500, 3), dtype=np.uint8)
    out, scale = T.resize_for_test(image, AugmentConfig(test_size=400, max_size=1333))
    assert out.shape == (400, 667, 3) and scale == pytest.approx(4 / 3)
    out, scale = T.resize_for_test(image, AugmentConfig(test_size=800, max_size=1000))
    assert out.shape == (600, 1000, 3) and scale == pytest.approx(2.0)


def test_non_rgb_input_is_refused():
    with pytest.raises(T.ImageFormatError, match="HxWx3 uint8"):
        T.weak_view(np.zeros((10, 10), np.uint8), SMALL, np.random.default_rng(0))
