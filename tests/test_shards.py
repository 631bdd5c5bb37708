"""Parquet shards of a COCO set: layout, content-keyed cache, atomic writes, bad images."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from softteacher.config import SyntheticConfig
from softteacher.data import shards as shards_module
from softteacher.data.coco import CocoDataset, load_coco
from softteacher.data.images import CorruptImageError
from softteacher.data.shards import SHARD_SCHEMA, SUCCESS_MARKER, EmptyDatasetError, write_shards
from softteacher.data.synthetic import generate_synthetic_coco

TINY = SyntheticConfig(num_train=24, num_val=4, min_size=64, max_size=96, num_classes=4)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic"), TINY).root


@pytest.fixture()
def dataset(synthetic_root: Path, tmp_path: Path) -> CocoDataset:
    """A private copy of the images, so a test may damage or touch them."""
    images = tmp_path / "images"
    images.mkdir()
    for source in (synthetic_root / "train").iterdir():
        (images / source.name).write_bytes(source.read_bytes())
    return load_coco(synthetic_root / "instances_train.json", images)


def _file_states(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_layout_rows_sorted_and_split_by_rows_per_shard(dataset: CocoDataset, tmp_path: Path):
    shuffled = dataclasses.replace(dataset, records=dataset.records[::-1])
    shard_set = write_shards(shuffled, tmp_path / "cache", rows_per_shard=10)

    assert [p.name for p in shard_set.files] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]
    assert shard_set.num_rows == 24 and shard_set.root == tmp_path / "cache" / shard_set.key
    tables = [pq.read_table(path) for path in shard_set.files]
    assert [t.num_rows for t in tables] == [10, 10, 4]
    assert all(t.schema.equals(SHARD_SCHEMA) for t in tables)
    ids = [i for t in tables for i in t.column("image_id").to_pylist()]
    assert ids == sorted(r.image_id for r in dataset.records)

    by_id = {r.image_id: r for r in dataset.records}
    for row in (row for t in tables for row in t.to_pylist()):
        record = by_id[row["image_id"]]
        assert row["file_name"] == record.file_name
        assert (row["width"], row["height"]) == (record.width, record.height)
        assert row["image"] == dataset.image_path(record).read_bytes()  # encoded, as on disk
        np.testing.assert_array_equal(np.reshape(row["boxes"], (-1, 4)), record.boxes)
        assert row["labels"] == record.labels.tolist()


def test_same_content_gives_same_key_and_identical_files(dataset: CocoDataset, tmp_path: Path):
    first = write_shards(dataset, tmp_path / "a", rows_per_shard=8)
    reordered = dataclasses.replace(dataset, records=dataset.records[::-1])
    second = write_shards(reordered, tmp_path / "b", rows_per_shard=8)

    assert first.key == second.key
    assert [p.name for p in first.files] == [p.name for p in second.files]
    for left, right in zip(first.files, second.files, strict=True):
        assert left.read_bytes() == right.read_bytes()


def test_second_call_reuses_the_cached_set(dataset: CocoDataset, tmp_path: Path):
    first = write_shards(dataset, tmp_path / "cache", rows_per_shard=8)
    for path in first.root.iterdir():  # an old mtime: any rewrite would show
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = _file_states(first.root)

    second = write_shards(dataset, tmp_path / "cache", rows_per_shard=8)

    assert second == first
    assert _file_states(second.root) == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.key]  # no leftovers


def test_changed_content_gets_a_new_key(dataset: CocoDataset, tmp_path: Path):
    cache = tmp_path / "cache"
    base = write_shards(dataset, cache, rows_per_shard=8).key

    record = dataset.records[0]
    moved = dataclasses.replace(record, boxes=record.boxes + 1.0)
    new_boxes = dataclasses.replace(dataset, records=[moved, *dataset.records[1:]])
    relabeled = dataclasses.replace(record, labels=(record.labels % 4) + 1)
    new_labels = dataclasses.replace(dataset, records=[relabeled, *dataset.records[1:]])
    keys = {
        "boxes": write_shards(new_boxes, cache, rows_per_shard=8).key,
        "labels": write_shards(new_labels, cache, rows_per_shard=8).key,
        "rows_per_shard": write_shards(dataset, cache, rows_per_shard=9).key,
    }
    image = dataset.image_path(dataset.records[3])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    keys["image mtime"] = write_shards(dataset, cache, rows_per_shard=8).key

    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_bad_image_file_fails_with_one_line_naming_it(
    dataset: CocoDataset, tmp_path: Path, damage: str
):
    victim = dataset.image_path(dataset.records[5])
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(b"")

    with pytest.raises(CorruptImageError) as caught:
        write_shards(dataset, tmp_path / "cache")

    message = str(caught.value)
    assert str(victim) in message and "\n" not in message
    assert not (tmp_path / "cache").exists()


def test_interrupted_conversion_never_looks_complete(
    dataset: CocoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real_write = shards_module.pq.write_table
    calls = []

    def dies_on_second_shard(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a Ctrl-C or a killed trial looks like here
        real_write(table, where, **kwargs)

    monkeypatch.setattr(shards_module.pq, "write_table", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_shards(dataset, tmp_path / "cache", rows_per_shard=8)
    monkeypatch.setattr(shards_module.pq, "write_table", real_write)

    assert not any(p.name[0] != "." for p in (tmp_path / "cache").iterdir())  # no published set
    shard_set = write_shards(dataset, tmp_path / "cache", rows_per_shard=8)
    assert (shard_set.root / SUCCESS_MARKER).is_file() and len(shard_set.files) == 3


def test_empty_dataset_is_refused(dataset: CocoDataset, tmp_path: Path):
    with pytest.raises(EmptyDatasetError, match="no images"):
        write_shards(dataclasses.replace(dataset, records=[]), tmp_path / "cache")
