"""Parquet shards of a COCO set: layout, content-keyed cache, atomic writes, bad images
(decoded once at conversion: left out or fatal), real sizes; the val images' one check."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from softteacher.config import AugmentConfig, SyntheticConfig
from softteacher.data import image_check
from softteacher.data import shards as shards_module
from softteacher.data.coco import CocoDataset, load_coco
from softteacher.data.image_check import check_val_images
from softteacher.data.images import CorruptImageError
from softteacher.data.rows import StreamPlan
from softteacher.data.shards import (
    SHARD_SCHEMA,
    SKIPPED_LIST,
    SUCCESS_MARKER,
    EmptyDatasetError,
    write_shards,
)
from softteacher.data.steps import LocalRowStream
from softteacher.data.synthetic import generate_synthetic_coco
from softteacher.tune.grid import SweepSettings
from softteacher.tune.prepared import VAL_CHECKS, prepare_folds

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


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_missing_image_file_fails_with_one_line_naming_it(
    dataset: CocoDataset, tmp_path: Path, policy: str
):
    """A missing file is most likely a wrong image root: never left out, whatever the policy."""
    victim = dataset.image_path(dataset.records[5])
    victim.unlink()

    with pytest.raises(CorruptImageError) as caught:
        write_shards(dataset, tmp_path / "cache", on_bad_image=policy)

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


# ---------------------------------------------------------------- images decoded once


def _damage(dataset: CocoDataset, index: int, how: str = "truncated") -> Path:
    victim = dataset.image_path(dataset.records[index])
    data = victim.read_bytes()
    victim.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    return victim


def _rows(shard_set) -> list[dict]:
    return [row for path in shard_set.files for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_skip_leaves_an_undecodable_image_out_and_lists_it(
    dataset: CocoDataset, tmp_path: Path, capsys: pytest.CaptureFixture, how: str
):
    victim = _damage(dataset, 5, how)

    shard_set = write_shards(dataset, tmp_path / "cache", rows_per_shard=10)

    assert (shard_set.num_rows, shard_set.num_skipped) == (23, 1)
    names = [row["file_name"] for row in _rows(shard_set)]
    assert len(names) == 23 and victim.name not in names
    listed = json.loads((shard_set.root / SKIPPED_LIST).read_text())
    assert [(e["file_name"], e["image_id"]) for e in listed] == [
        (victim.name, dataset.records[5].image_id)
    ]
    assert str(victim) in listed[0]["error"]
    marker = json.loads((shard_set.root / SUCCESS_MARKER).read_text())
    assert (marker["num_rows"], marker["num_skipped"]) == (23, 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(victim) in err
    assert f"1 of 24 images in {dataset.ann_file} cannot be decoded and are left out" in err
    assert str(shard_set.root / SKIPPED_LIST) in err


def test_fail_names_the_bad_images_and_writes_nothing(dataset: CocoDataset, tmp_path: Path):
    victims = [_damage(dataset, index) for index in (5, 7, 9, 11)]

    with pytest.raises(CorruptImageError) as caught:
        write_shards(dataset, tmp_path / "cache", on_bad_image="fail")

    message = str(caught.value)
    assert "\n" not in message and message.startswith("4 of 24 images in ")
    assert ", ".join(v.name for v in victims[:3]) + " and 1 more" in message
    assert str(victims[0]) in message and "pass --on-bad-image skip" in message
    assert not (tmp_path / "cache").exists()
    # a set cached by an earlier "skip" run does not pass a "fail" run either
    assert write_shards(dataset, tmp_path / "cache").num_skipped == 4
    with pytest.raises(CorruptImageError, match=f"4 of 24 images.*{victims[0].name}"):
        write_shards(dataset, tmp_path / "cache", on_bad_image="fail")


def test_a_set_of_nothing_but_bad_images_is_refused(dataset: CocoDataset, tmp_path: Path):
    small = dataclasses.replace(dataset, records=dataset.records[:2])
    _damage(small, 0)
    _damage(small, 1, "empty")
    with pytest.raises(EmptyDatasetError, match="none of the 2 images .* can be decoded"):
        write_shards(small, tmp_path / "cache")


def _refuse_to_decode(path: str):
    raise AssertionError(f"decoded {path} again")


def test_a_cached_set_is_not_decoded_again(
    dataset: CocoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    _damage(dataset, 3)
    first = write_shards(dataset, tmp_path / "cache", rows_per_shard=8)
    monkeypatch.setattr(image_check, "_outcomes", {})  # nothing remembered in this process
    monkeypatch.setattr(image_check, "check_image_file", _refuse_to_decode)
    capsys.readouterr()

    assert write_shards(dataset, tmp_path / "cache", rows_per_shard=8) == first
    # the set is smaller than its file: said again at every use, without decoding
    assert "1 of 24 images in" in capsys.readouterr().err
    # the patch does bite: a set not cached is decoded
    with pytest.raises(AssertionError, match="decoded"):
        write_shards(dataset, tmp_path / "cache", rows_per_shard=9)


def test_sets_sharing_images_decode_each_image_once_a_process(
    dataset: CocoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(image_check, "_outcomes", {})
    calls = []
    real = image_check.check_image_file
    monkeypatch.setattr(image_check, "check_image_file", lambda p: calls.append(p) or real(p))

    write_shards(dataset, tmp_path / "cache", rows_per_shard=8)
    labeled = dataclasses.replace(dataset, records=dataset.records[:5])  # as a fold's subset
    write_shards(labeled, tmp_path / "cache", rows_per_shard=8)

    assert len(calls) == 24


def test_a_wrong_annotated_size_warns_once_and_rows_hold_the_real_size(
    dataset: CocoDataset, tmp_path: Path, capsys: pytest.CaptureFixture
):
    records = list(dataset.records)
    for index in (2, 4):
        records[index] = dataclasses.replace(records[index], width=records[index].width + 10)
    wrong = dataclasses.replace(dataset, records=records)

    shard_set = write_shards(wrong, tmp_path / "cache", rows_per_shard=10)

    err = capsys.readouterr().err
    first = records[2]
    with Image.open(dataset.image_path(first)) as image:
        real = image.size
    assert err.count("\n") == 1 and err.startswith("warning: 2 of 24 images in ")
    assert (
        f"(first: {first.file_name} is {real[0]}x{real[1]} (WxH), the annotation says "
        f"{real[0] + 10}x{real[1]})" in err
    )
    rows = {row["image_id"]: row for row in _rows(shard_set)}
    for record in dataset.records:
        with Image.open(dataset.image_path(record)) as image:
            assert (rows[record.image_id]["width"], rows[record.image_id]["height"]) == image.size
    np.testing.assert_array_equal(
        np.reshape(rows[first.image_id]["boxes"], (-1, 4)), first.boxes
    )  # as annotated
    # the stream decodes every row against its (real) size: training does not stop
    augment = AugmentConfig(train_sizes=(40, 56), max_size=96, test_size=48)
    plan = StreamPlan("labeled", shard_set.num_rows, seed=0)
    assert LocalRowStream(shard_set, plan, augment).take(24).num_rows == 24


def test_a_large_set_is_checked_in_a_process_pool_with_progress_lines(
    dataset: CocoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    victim = _damage(dataset, 6)
    monkeypatch.setattr(image_check, "_outcomes", {})
    monkeypatch.setattr(image_check, "PARALLEL_FROM", 2)
    monkeypatch.setattr(image_check, "PROGRESS_FROM", 10)
    monkeypatch.setattr(image_check.os, "cpu_count", lambda: 2)
    pools = []

    class SpyPool(image_check.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(image_check, "ProcessPoolExecutor", SpyPool)

    shard_set = write_shards(dataset, tmp_path / "cache")

    assert (shard_set.num_rows, shard_set.num_skipped) == (23, 1)
    assert victim.name in (shard_set.root / SKIPPED_LIST).read_text()
    assert pools == [(2,)]
    out = capsys.readouterr().out.splitlines()
    steps = (3, 6, 9, 12, 15, 18, 21, 24)
    assert out == [f"checking images of instances_train.json: {i}/24" for i in steps]


# ---------------------------------------------------------------- val images


def test_a_bad_val_image_is_an_error_and_a_good_set_is_checked_once(
    dataset: CocoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    markers = tmp_path / VAL_CHECKS
    victim = dataset.image_path(dataset.records[4])
    good = victim.read_bytes()
    _damage(dataset, 4)
    with pytest.raises(CorruptImageError) as caught:
        check_val_images(dataset, markers, "digest")
    message = str(caught.value)
    assert "\n" not in message and str(victim) in message and "val images" in message
    assert "re-download" in message and not markers.exists()

    victim.write_bytes(good)
    check_val_images(dataset, markers, "digest")
    assert len(list(markers.iterdir())) == 1
    monkeypatch.setattr(image_check, "_outcomes", {})
    monkeypatch.setattr(image_check, "check_image_file", _refuse_to_decode)
    check_val_images(dataset, markers, "digest")  # served from the marker
    with pytest.raises(AssertionError, match="decoded"):  # new content: checked again
        check_val_images(dataset, markers, "another digest")


def test_a_val_image_of_the_wrong_size_is_an_error_naming_the_fix(
    dataset: CocoDataset, tmp_path: Path
):
    record = dataset.records[1]
    wrong = dataclasses.replace(
        dataset, records=[dataclasses.replace(record, height=record.height + 1)]
    )
    with pytest.raises(CorruptImageError, match=f"{record.file_name} is .*fix width/height"):
        check_val_images(wrong, tmp_path / VAL_CHECKS, "digest")


def _smoke_settings(tmp_path: Path, on_bad_image: str) -> SweepSettings:
    return SweepSettings(
        preset="smoke", ratios=(10.0,), folds=(1,), data_dir=str(tmp_path / "data"),
        results_dir=str(tmp_path / "results"), on_bad_image=on_bad_image,
    )


def test_prepare_folds_passes_the_bad_image_policy_to_the_shards(tmp_path: Path):
    fold = next(iter(prepare_folds(_smoke_settings(tmp_path, "skip")).values())).data
    victim = sorted(fold.train_images.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:150])

    with pytest.raises(CorruptImageError, match=f"{victim.name}.*--on-bad-image skip"):
        prepare_folds(_smoke_settings(tmp_path, "fail"))
    prepared = next(iter(prepare_folds(_smoke_settings(tmp_path, "skip")).values()))
    assert prepared.labeled.num_skipped + prepared.unlabeled.num_skipped == 1


def test_prepare_folds_stops_on_a_bad_val_image_before_any_shard(tmp_path: Path):
    settings = _smoke_settings(tmp_path, "skip")
    prepared = prepare_folds(settings)  # makes the synthetic set; all images good
    fold = next(iter(prepared.values())).data
    victim = sorted(fold.val_images.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:150])
    for shards in (tmp_path / "data" / "shards").iterdir():
        os.rename(shards, tmp_path / shards.name)  # a fresh data dir but for the images

    with pytest.raises(CorruptImageError, match=f"1 of .* val images .*{victim.name}"):
        prepare_folds(settings)
    assert not any((tmp_path / "data" / "shards").iterdir())


# ---------------------------------------------------------------- the option


def test_both_sweep_commands_pass_on_bad_image_without_renaming_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import ablations
    import fold_sweep

    for command, settings_of in ((fold_sweep, lambda s: s), (ablations, lambda s: s.sweep)):
        default = settings_of(command.settings_from_args(command.parse_args([])))
        chosen = settings_of(
            command.settings_from_args(command.parse_args(["--on-bad-image", "fail"]))
        )
        assert (default.on_bad_image, chosen.on_bad_image) == ("skip", "fail")
        assert chosen.name == default.name  # a finished trial is the same under either
    with pytest.raises(SystemExit):
        fold_sweep.parse_args(["--on-bad-image", "ignore"])
