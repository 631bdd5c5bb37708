"""The synthetic shapes set: deterministic, valid COCO, class = shape (never colour)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softteacher.config import SyntheticConfig
from softteacher.data import synthetic
from softteacher.data.coco import load_coco
from softteacher.data.scenes import render_synthetic_image
from softteacher.data.synthetic import (
    SyntheticConfigError,
    SyntheticDirError,
    ensure_synthetic_coco,
    generate_synthetic_coco,
)

TINY = SyntheticConfig(num_train=12, num_val=5, min_size=64, max_size=96, seed=3)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _visible_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    generate_synthetic_coco(tmp_path / "a", TINY)
    generate_synthetic_coco(tmp_path / "b", TINY)
    generate_synthetic_coco(tmp_path / "c", dataclasses.replace(TINY, seed=4))
    a, b, c = (_all_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["instances_train.json"] != c["instances_train.json"]
    assert a["train/000001.jpg"] != c["train/000001.jpg"]


def test_images_do_not_depend_on_set_size_or_order() -> None:
    """Per-image seeds: image 5 is the same whether 6 or 600 are drawn, in any order."""
    big = dataclasses.replace(TINY, num_train=600)
    later = render_synthetic_image(big, "train", 5)
    again = render_synthetic_image(TINY, "train", 5)
    assert np.array_equal(later.image, again.image) and later.objects == again.objects
    assert not np.array_equal(
        render_synthetic_image(TINY, "val", 5).image[:10], later.image[:10]
    )


def test_files_are_valid_coco_with_boxes_inside_their_images(tmp_path: Path) -> None:
    dataset = generate_synthetic_coco(tmp_path, TINY)
    for split, count in (("train", TINY.num_train), ("val", TINY.num_val)):
        content = _read(dataset.ann_file(split))
        assert [img["id"] for img in content["images"]] == list(range(1, count + 1))
        assert [c["id"] for c in content["categories"]] == list(range(1, 9))
        assert {c["supercategory"] for c in content["categories"]} == {"shape"}
        assert len({c["name"] for c in content["categories"]}) == 8
        sizes = {}
        for image in content["images"]:
            with Image.open(dataset.image_dir(split) / image["file_name"]) as jpeg:
                assert jpeg.format == "JPEG"
                assert jpeg.size == (image["width"], image["height"])
            assert TINY.min_size <= image["width"] <= TINY.max_size
            assert TINY.min_size <= image["height"] <= TINY.max_size
            sizes[image["id"]] = (image["width"], image["height"])
        per_image = {image_id: 0 for image_id in sizes}
        for ann in content["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0
            assert x + w <= width and y + h <= height
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert 1 <= ann["category_id"] <= 8
            per_image[ann["image_id"]] += 1
        assert all(TINY.min_objects <= n <= TINY.max_objects for n in per_image.values())
        assert [a["id"] for a in content["annotations"]] == list(
            range(1, len(content["annotations"]) + 1)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no box needs clipping or dropping
        loaded = load_coco(dataset.train_ann, dataset.train_images)
    assert loaded.num_classes == 8 and len(loaded.records) == TINY.num_train
    assert loaded.image_path(loaded.records[0]).is_file()


def test_object_count_bounds_are_respected() -> None:
    cfg = dataclasses.replace(TINY, min_objects=3, max_objects=4)
    counts = {len(render_synthetic_image(cfg, "train", i).objects) for i in range(30)}
    assert counts <= {3, 4}


@pytest.mark.parametrize("num_classes", [6, 10])
def test_category_count_and_all_shapes_used(num_classes: int) -> None:
    cfg = dataclasses.replace(TINY, num_classes=num_classes)
    names = [c["name"] for c in synthetic.categories(cfg)]
    assert len(names) == len(set(names)) == num_classes
    images = [render_synthetic_image(cfg, "train", i) for i in range(60)]
    seen = {obj.category_id for image in images for obj in image.objects}
    assert seen == set(range(1, num_classes + 1))


@pytest.mark.parametrize(
    "change",
    [{"num_classes": 11}, {"num_classes": 0}, {"min_size": 100, "max_size": 90},
     {"min_objects": 0}, {"max_object_frac": 1.5}, {"num_val": 0}],
)
def test_bad_configs_are_rejected(change: dict, tmp_path: Path) -> None:
    with pytest.raises(SyntheticConfigError, match="SyntheticConfig"):
        generate_synthetic_coco(tmp_path, dataclasses.replace(TINY, **change))


def test_colour_does_not_predict_the_class() -> None:
    """Every class's colours come from the same spread: class means sit near the overall mean."""
    cfg = dataclasses.replace(TINY, num_classes=6, min_size=96, max_size=128)
    colours: dict[int, list] = {}
    for i in range(150):
        for obj in render_synthetic_image(cfg, "train", i).objects:
            colours.setdefault(obj.category_id, []).append(obj.colour)
    everything = np.concatenate([np.asarray(c, float) for c in colours.values()])
    overall = everything.mean(axis=0)
    assert len(colours) == 6
    for category_id, values in colours.items():
        values = np.asarray(values, float)
        assert len(values) > 50, category_id
        # A uniform channel has std ~74, so the mean of > 50 objects moves by ~10 at most.
        assert np.all(np.abs(values.mean(axis=0) - overall) < 30), category_id
        assert np.all(values.std(axis=0) > 50), category_id


def test_ensure_reuses_a_matching_set_and_regenerates_a_changed_one(tmp_path: Path) -> None:
    out = tmp_path / "set"
    first = ensure_synthetic_coco(out, TINY)
    stamps = {p: p.stat().st_mtime_ns for p in (first.train_ann, out / "synthetic.json")}
    again = ensure_synthetic_coco(out, TINY)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    changed = dataclasses.replace(TINY, seed=9, num_train=7)
    regenerated = ensure_synthetic_coco(out, changed)
    assert len(_read(regenerated.train_ann)["images"]) == 7
    assert len(list(regenerated.train_images.iterdir())) == 7
    assert _read(out / "synthetic.json")["config"]["seed"] == 9
    assert _visible_entries(tmp_path) == ["set"]  # no staging folder left


def test_ensure_regenerates_an_incomplete_set(tmp_path: Path) -> None:
    dataset = ensure_synthetic_coco(tmp_path / "set", TINY)
    (dataset.train_images / "000003.jpg").unlink()
    ensure_synthetic_coco(tmp_path / "set", TINY)
    assert (dataset.train_images / "000003.jpg").is_file()


def test_a_killed_generation_leaves_no_set_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = synthetic.write_image

    def dies_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_image", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_coco(tmp_path / "set", TINY)
    assert os.listdir(tmp_path) == [".set.lock"]


def test_leftovers_of_a_hard_killed_run_are_cleaned_up(tmp_path: Path) -> None:
    stale = tmp_path / ".set.staging-abc123"
    (stale / "train").mkdir(parents=True)
    ensure_synthetic_coco(tmp_path / "set", TINY)
    assert sorted(os.listdir(tmp_path)) == [".set.lock", "set"]


def test_foreign_folders_are_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SyntheticDirError, match=str(tmp_path)):
        ensure_synthetic_coco(tmp_path, TINY)
    with pytest.raises(SyntheticDirError, match=str(tmp_path)):
        generate_synthetic_coco(tmp_path, TINY)
    assert os.listdir(tmp_path) == ["mine.txt"]
