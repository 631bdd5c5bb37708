"""COCO loading: one-line errors naming the file, bad boxes counted, labels contiguous."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from softteacher.data.coco import (
    CocoFormatError,
    check_same_categories,
    coco_summary,
    load_coco,
)

BASE = {
    "info": {"description": "test"},
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 32, "height": 24},
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 40},
        {"id": 3, "file_name": "c.jpg", "width": 16, "height": 16},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 32, 24], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 90, "bbox": [5.5, 6, 1, 2]},
    ],
    "categories": [
        {"id": 7, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    ],
}


def _write(tmp_path: Path, content: object, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


def _with(**changes) -> dict:
    content = copy.deepcopy(BASE)
    content.update(changes)
    return content


def _annotation(**fields) -> dict:
    return {"id": 99, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4], **fields}


def _assert_format_error(path: Path, match: str) -> None:
    with pytest.raises(CocoFormatError, match=match) as info:
        load_coco(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_loads_records_with_contiguous_labels(tmp_path: Path) -> None:
    dataset = load_coco(_write(tmp_path, BASE), tmp_path / "images")
    assert [c["id"] for c in dataset.categories] == [3, 7, 90]
    assert dataset.cat_id_to_label == {3: 1, 7: 2, 90: 3}
    assert dataset.label_to_cat_id == {1: 3, 2: 7, 3: 90}
    assert dataset.num_classes == 3
    assert dataset.image_ids == [1, 2, 3]
    first, second, third = dataset.records
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    np.testing.assert_array_equal(first.boxes, [[2, 3, 12, 8], [0, 0, 32, 24]])
    np.testing.assert_array_equal(first.labels, [2, 1])
    np.testing.assert_array_equal(second.boxes, [[5.5, 6, 6.5, 8]])
    np.testing.assert_array_equal(second.labels, [3])
    assert third.boxes.shape == (0, 4) and third.labels.shape == (0,)
    assert dataset.image_path(second) == tmp_path / "images" / "b.jpg"
    assert (dataset.clipped_boxes, dataset.dropped_boxes, dataset.crowd_boxes) == (0, 0, 0)


def test_image_path_without_root_says_how_to_fix(tmp_path: Path) -> None:
    dataset = load_coco(_write(tmp_path, BASE))
    with pytest.raises(CocoFormatError, match="image_root"):
        dataset.image_path(dataset.records[0])


def test_missing_file(tmp_path: Path) -> None:
    _assert_format_error(tmp_path / "nope.json", "not found")


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text('{"images": [')
    _assert_format_error(path, "not valid JSON")


def test_top_level_not_an_object(tmp_path: Path) -> None:
    _assert_format_error(_write(tmp_path, [1, 2]), "not a JSON object")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path: Path, key: str) -> None:
    content = copy.deepcopy(BASE)
    del content[key]
    _assert_format_error(_write(tmp_path, content), key)


@pytest.mark.parametrize("key", ["id", "file_name", "width", "height"])
def test_image_missing_a_field(tmp_path: Path, key: str) -> None:
    content = copy.deepcopy(BASE)
    del content["images"][1][key]
    _assert_format_error(_write(tmp_path, content), f"image 1 lacks \\['{key}'\\]")


def test_image_with_a_bad_size(tmp_path: Path) -> None:
    content = copy.deepcopy(BASE)
    content["images"][0]["width"] = 0
    _assert_format_error(_write(tmp_path, content), "positive whole width")


def test_duplicate_image_ids(tmp_path: Path) -> None:
    content = copy.deepcopy(BASE)
    content["images"][2]["id"] = 1
    _assert_format_error(_write(tmp_path, content), "image id 1 appears twice")


def test_annotation_with_unknown_image(tmp_path: Path) -> None:
    content = _with(annotations=[_annotation(image_id=42)])
    _assert_format_error(_write(tmp_path, content), "unknown image id 42")


def test_annotation_with_unknown_category(tmp_path: Path) -> None:
    content = _with(annotations=[_annotation(category_id=5)])
    _assert_format_error(_write(tmp_path, content), "unknown category id 5")


@pytest.mark.parametrize(
    "bbox", [[1, 2, 3], "1,2,3,4", "1234", [1, 2, "3", 4], [1, 2, None, 4], [1, 2, True, 4], None]
)
def test_malformed_bbox(tmp_path: Path, bbox: object) -> None:
    content = _with(annotations=[_annotation(bbox=bbox)])
    _assert_format_error(_write(tmp_path, content), "malformed bbox")


def test_annotation_that_is_not_an_object(tmp_path: Path) -> None:
    _assert_format_error(_write(tmp_path, _with(annotations=[[1, 2]])), "not an object")


def test_annotation_without_category(tmp_path: Path) -> None:
    annotation = _annotation()
    del annotation["category_id"]
    _assert_format_error(_write(tmp_path, _with(annotations=[annotation])), "unknown category")


def test_non_finite_bbox(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_with(annotations=[_annotation(bbox=[1, 2, float("nan"), 4])])))
    _assert_format_error(path, "malformed bbox")


def test_duplicate_category_ids(tmp_path: Path) -> None:
    content = _with(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}],
                    annotations=[])
    _assert_format_error(_write(tmp_path, content), "category id 1 appears twice")


BAD_BOXES = [
    _annotation(id=10, bbox=[-5, 2, 20, 10]),  # leaves the 32x24 image on the left: clip
    _annotation(id=11, bbox=[3, 3, 0, 5]),  # zero width: always dropped
    _annotation(id=12, bbox=[40, 2, 5, 5]),  # wholly outside: empty after clipping
    _annotation(id=13, bbox=[4, 4, 8, 8]),  # fine
]


def test_clip_clips_and_drops_what_becomes_empty(tmp_path: Path) -> None:
    path = _write(tmp_path, _with(annotations=BAD_BOXES))
    with pytest.warns(UserWarning, match="1 boxes clipped") as caught:
        dataset = load_coco(path, on_bad_box="clip")
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert "2 empty or out-of-image boxes dropped" in str(caught[0].message)
    assert (dataset.clipped_boxes, dataset.dropped_boxes) == (1, 2)
    np.testing.assert_array_equal(dataset.records[0].boxes, [[0, 2, 15, 12], [4, 4, 12, 12]])


def test_drop_drops_every_bad_box(tmp_path: Path) -> None:
    path = _write(tmp_path, _with(annotations=BAD_BOXES))
    with pytest.warns(UserWarning, match=r"0 boxes clipped.*3 empty or out-of-image"):
        dataset = load_coco(path, on_bad_box="drop")
    assert (dataset.clipped_boxes, dataset.dropped_boxes) == (0, 3)
    np.testing.assert_array_equal(dataset.records[0].boxes, [[4, 4, 12, 12]])


def test_error_policy_raises_on_a_bad_box(tmp_path: Path) -> None:
    path = _write(tmp_path, _with(annotations=BAD_BOXES))
    with pytest.raises(CocoFormatError, match="on_bad_box='clip'"):
        load_coco(path, on_bad_box="error")


def test_good_files_load_without_warnings(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco(_write(tmp_path, BASE))


def test_crowd_annotations_are_skipped_and_counted(tmp_path: Path) -> None:
    annotations = [_annotation(id=1, iscrowd=1), _annotation(id=2, bbox=[0, 0, 3, 3])]
    dataset = load_coco(_write(tmp_path, _with(annotations=annotations)))
    assert dataset.crowd_boxes == 1
    np.testing.assert_array_equal(dataset.records[0].boxes, [[0, 0, 3, 3]])


def test_a_file_whose_every_annotation_is_crowd_warns_it_has_no_training_box(
    tmp_path: Path,
) -> None:
    annotations = [_annotation(id=1, iscrowd=1), _annotation(id=2, iscrowd=1)]
    with pytest.warns(UserWarning, match="none of its 2 annotations is a training box .2 crowd"):
        dataset = load_coco(_write(tmp_path, _with(annotations=annotations)))
    assert dataset.crowd_boxes == 2
    with warnings.catch_warnings():  # an unlabeled file: no annotation at all, no warning
        warnings.simplefilter("error")
        load_coco(_write(tmp_path, _with(annotations=[]), "unlabeled.json"))


def test_check_same_categories(tmp_path: Path) -> None:
    labeled = load_coco(_write(tmp_path, BASE, "labeled.json"))
    same = load_coco(_write(tmp_path, _with(annotations=[]), "unlabeled.json"))
    check_same_categories(labeled, same)

    renamed = copy.deepcopy(BASE["categories"])
    renamed[0]["name"] = "wolf"
    other = load_coco(_write(tmp_path, _with(categories=renamed), "other.json"))
    with pytest.raises(CocoFormatError, match="categories differ") as info:
        check_same_categories(labeled, other)
    assert "labeled.json" in str(info.value) and "other.json" in str(info.value)

    fewer = load_coco(_write(tmp_path, _with(categories=BASE["categories"][:2], annotations=[]),
                             "fewer.json"))
    with pytest.raises(CocoFormatError, match="toothbrush"):
        check_same_categories(labeled, fewer)


def test_duplicate_annotation_ids(tmp_path: Path) -> None:
    """pycocotools keeps one annotation an id: a repeated id would score the file wrongly."""
    content = copy.deepcopy(BASE)
    content["annotations"][2]["id"] = 1
    match = r"annotation id 1 appears twice \(annotations 0 and 2\)"
    _assert_format_error(_write(tmp_path, content), match)


@pytest.mark.parametrize("ann_id", [None, "7", 1.0, True])
def test_annotation_ids_must_be_integers(tmp_path: Path, ann_id: object) -> None:
    annotation = _annotation(id=ann_id)
    if ann_id is None:
        del annotation["id"]
    _assert_format_error(_write(tmp_path, _with(annotations=[annotation])), "integer 'id'")


def test_images_without_annotations_are_kept_with_no_boxes(tmp_path: Path) -> None:
    """Image 3 has no annotation and image 2 only a crowd one: both are ordinary images."""
    annotations = [*BASE["annotations"][:2], _annotation(id=4, image_id=2, iscrowd=1)]
    dataset = load_coco(_write(tmp_path, _with(annotations=annotations)))
    assert dataset.image_ids == [1, 2, 3] and dataset.crowd_boxes == 1
    for record in dataset.records[1:]:
        assert record.boxes.shape == (0, 4) and record.labels.shape == (0,)


def test_summary_counts_images_and_categories_without_the_records(tmp_path: Path) -> None:
    summary = coco_summary(_write(tmp_path, BASE))
    assert (summary.num_images, summary.num_classes) == (3, 3)
    assert [c["id"] for c in summary.categories] == [3, 7, 90]
    with pytest.raises(CocoFormatError, match="'categories' is empty"):
        coco_summary(_write(tmp_path, _with(categories=[]), "empty.json"))


def test_category_ids_that_differ_name_both_files(tmp_path: Path) -> None:
    renumbered = copy.deepcopy(BASE["categories"])
    renumbered[2]["id"] = 91
    train = coco_summary(_write(tmp_path, BASE, "train.json"))
    val = coco_summary(_write(tmp_path, _with(categories=renumbered), "val.json"))
    with pytest.raises(CocoFormatError) as info:
        check_same_categories(train, val)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "train.json") in message
    assert "only in train.json: [(90, 'toothbrush')]" in message
    assert "only in val.json: [(91, 'toothbrush')]" in message
