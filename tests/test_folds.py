"""STAC folds: exact counts, rebuilt from (fold, percent) alone, files users know."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from softteacher.data.coco import CocoFormatError, check_same_categories, load_coco
from softteacher.data.folds import (
    FoldError,
    fold_paths,
    labeled_count,
    split_fold,
    write_fold,
    write_folds,
)
from softteacher.data.protocol import (
    DatasetLayoutError,
    check_coco_layout,
    coco_folds,
    coco_root_summary,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("n", "percent", "expected"),
    [
        (1, 1, 1), (10, 1, 1), (99, 1, 1), (100, 1, 1), (250, 1, 2), (1000, 0.5, 5),
        (20, 10, 2), (7, 10, 1), (118_287, 1, 1182), (118_287, 5, 5914),
        (118_287, 10, 11828), (50, 100, 50),
    ],
)
def test_labeled_count_is_exact(n: int, percent: float, expected: int) -> None:
    assert labeled_count(n, percent) == expected
    labeled, unlabeled = split_fold(list(range(1000, 1000 + n)), percent, fold=1)
    assert len(labeled) == expected and len(unlabeled) == n - expected


def test_split_is_disjoint_complete_and_sorted() -> None:
    ids = random.Random(0).sample(range(1, 10**9), 5000)
    labeled, unlabeled = split_fold(ids, 5, fold=2)
    assert not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == sorted(ids)
    assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)


def test_split_depends_on_fold_and_percent_only() -> None:
    ids = list(range(1, 3001))
    shuffled = ids[::-1]
    random.Random(1).shuffle(shuffled)
    assert split_fold(ids, 1, 3) == split_fold(shuffled, 1, 3) == split_fold(tuple(ids), 1.0, 3)
    folds = [set(split_fold(ids, 1, fold)[0]) for fold in range(1, 6)]
    assert all(a != b for i, a in enumerate(folds) for b in folds[i + 1 :])
    assert split_fold(ids, 5, 1)[0] != split_fold(ids, 1, 1)[0]


def test_split_is_pinned_across_versions() -> None:
    """Folds must be rebuildable forever: a changed hash or key format must fail here."""
    assert split_fold(range(1, 21), 10, 1)[0] == [8, 9]
    assert split_fold(range(1, 21), 10, 2)[0] == [16, 18]
    assert split_fold(range(1, 101), 5, 1)[0] == [1, 16, 22, 27, 50]


@pytest.mark.parametrize(
    ("ids", "percent", "fold"),
    [([1, 2], 0, 1), ([1, 2], 101, 1), ([1, 2], -1, 1), ([1, 2], 10, -1), ([1, 2], 10, 1.5),
     ([], 10, 1), ([1, 1, 2], 10, 1)],
)
def test_bad_requests_raise(ids: list, percent: float, fold: int) -> None:
    with pytest.raises(FoldError):
        split_fold(ids, percent, fold)


def test_file_names() -> None:
    out = Path("/x")
    assert fold_paths(out, 1, 1) == (
        out / "instances_train2017.1@1.json", out / "instances_train2017.1@1-unlabeled.json"
    )
    assert fold_paths(out, 10.0, 5)[0].name == "instances_train2017.5@10.json"
    assert fold_paths(out, 0.5, 2)[1].name == "instances_train2017.2@0.5-unlabeled.json"
    assert fold_paths(out, 5, 3, stem="shapes")[0].name == "shapes.3@5.json"


def _coco(num_images: int, anns_per_image: int = 2) -> dict:
    images = [
        {"id": 10 * i, "file_name": f"{i}.jpg", "width": 50, "height": 40}
        for i in range(1, num_images + 1)
    ]
    annotations = [
        {"id": len(images) * k + j, "image_id": image["id"], "category_id": 1 + k % 2,
         "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0}
        for j, image in enumerate(images) for k in range(anns_per_image)
    ]
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    return {"info": {"year": 2017}, "licenses": [{"id": 1, "name": "CC"}],
            "images": images, "annotations": annotations, "categories": categories}


def _write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps(content))
    return path


def test_write_fold_splits_images_and_keeps_unlabeled_annotations(tmp_path: Path) -> None:
    source = _coco(40)
    ann = _write(tmp_path, source)
    files = write_fold(ann, tmp_path / "folds", 10, 3)
    assert (files.labeled, files.unlabeled) == fold_paths(tmp_path / "folds", 10, 3)
    assert set(files.written) == {files.labeled, files.unlabeled}
    labeled, unlabeled = (json.loads(p.read_text()) for p in (files.labeled, files.unlabeled))

    expected_ids, _ = split_fold([img["id"] for img in source["images"]], 10, 3)
    assert [img["id"] for img in labeled["images"]] == expected_ids
    assert (files.num_labeled, files.num_unlabeled) == (4, 36)
    assert len(unlabeled["images"]) == 36
    assert {a["image_id"] for a in labeled["annotations"]} == set(expected_ids)
    assert len(unlabeled["annotations"]) == 72 == files.unlabeled_annotations
    assert files.labeled_annotations == 8
    assert sorted(labeled["annotations"] + unlabeled["annotations"],
                  key=lambda a: a["id"]) == sorted(source["annotations"], key=lambda a: a["id"])
    for part in (labeled, unlabeled):
        for key in ("info", "licenses", "categories"):
            assert part[key] == source[key]
    check_same_categories(load_coco(files.labeled), load_coco(files.unlabeled))


def test_rewrites_only_what_changed(tmp_path: Path) -> None:
    ann = _write(tmp_path, _coco(30))
    first = write_folds(ann, tmp_path / "folds", [1, 10], [1, 2])
    assert len(first) == 4 and all(len(f.written) == 2 for f in first)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "folds").iterdir()}
    assert len(stamps) == 8

    again = write_folds(ann, tmp_path / "folds", [1, 10], [1, 2])
    assert all(f.written == () for f in again)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    damaged = first[0].unlabeled
    damaged.write_bytes(damaged.read_bytes().replace(b'"width":50', b'"width":51'))
    third = write_folds(ann, tmp_path / "folds", [1, 10], [1, 2])
    assert [f.written for f in third] == [(damaged,), (), (), ()]
    assert b'"width":51' not in damaged.read_bytes()
    assert not [p for p in (tmp_path / "folds").iterdir() if p.name.startswith(".")]


def test_source_errors_name_the_file(tmp_path: Path) -> None:
    content = _coco(5)
    content["annotations"][0]["image_id"] = 12345
    ann = _write(tmp_path, content)
    with pytest.raises(CocoFormatError, match=str(ann)):
        write_fold(ann, tmp_path / "folds", 10, 1)
    with pytest.raises(CocoFormatError, match="not found"):
        write_fold(tmp_path / "missing.json", tmp_path / "folds", 10, 1)


def test_cli_writes_the_files(tmp_path: Path) -> None:
    ann = _write(tmp_path, _coco(50))
    out = tmp_path / "folds"
    command = [sys.executable, str(REPO / "experiments" / "prepare_folds.py"), "--ann", str(ann),
               "--percents", "1,0.5,10", "--folds", "1,2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 12 and all(line.startswith("wrote ") for line in lines)
    assert (out / "instances_train2017.2@0.5-unlabeled.json").is_file()
    assert len(list(out.iterdir())) == 12
    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    assert all(line.startswith("unchanged ") for line in rerun.stdout.strip().splitlines())

    failed = subprocess.run(command[:3] + [str(tmp_path / "nope.json")] + command[4:],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "nope.json" in failed.stderr


def test_folds_of_a_train2017_sized_file_have_the_exact_counts(tmp_path: Path) -> None:
    """118k images, one annotation each (COCO train2017's image count)."""
    ann = _write(tmp_path, _coco(118_287, anns_per_image=1))
    results = write_folds(ann, tmp_path / "folds", [1, 10], [1])
    assert [(r.num_labeled, r.num_unlabeled) for r in results] == [(1182, 117_105),
                                                                   (11_828, 106_459)]
    assert [r.labeled_annotations for r in results] == [1182, 11_828]


def _coco_root(tmp_path: Path, train: dict, val: dict) -> Path:
    root = tmp_path / "coco"
    for folder in ("train2017", "val2017", "annotations"):
        (root / folder).mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    return root


@pytest.mark.parametrize(
    ("folders", "files", "expected"),
    [
        (["train2017"], [], "train2017/"),
        ([], ["instances_val2017.json"], "annotations/instances_val2017.json"),
        (["val2017"], ["instances_train2017.json"],
         "val2017/, annotations/instances_train2017.json"),
    ],
)
def test_a_coco_root_names_exactly_what_it_lacks(
    tmp_path: Path, folders: list[str], files: list[str], expected: str
) -> None:
    root = _coco_root(tmp_path, _coco(4), _coco(2))
    for folder in folders:
        (root / folder).rmdir()
    for name in files:
        (root / "annotations" / name).unlink()
    for check in (lambda: check_coco_layout(root), lambda: coco_folds(root, tmp_path, [10], [1])):
        with pytest.raises(DatasetLayoutError, match=f"lacks {expected};"):
            check()
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        check_coco_layout(tmp_path / "nowhere")


def test_a_coco_root_s_summary_is_its_train_file_checked_against_val(tmp_path: Path) -> None:
    root = _coco_root(tmp_path, _coco(12), _coco(3))
    summary = coco_root_summary(root)
    assert (summary.num_images, summary.num_classes) == (12, 2)
    assert summary.ann_file == root / "annotations" / "instances_train2017.json"

    val = _coco(3)
    val["categories"][1]["id"] = 5  # the same names, another id
    other = _coco_root(tmp_path / "other", _coco(12), val)
    with pytest.raises(CocoFormatError) as info:
        coco_root_summary(other)
    message = str(info.value)
    assert "\n" not in message and "categories differ" in message
    assert "instances_train2017.json" in message and "instances_val2017.json" in message
