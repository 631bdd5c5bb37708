"""The Ray Data stream: lossless rows, epochs that repeat and reshuffle, exact 1:4 steps
on two real Ray Train workers, and one-line failures instead of hangs."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402

from softteacher.config import AugmentConfig, SyntheticConfig  # noqa: E402
from softteacher.data.coco import load_coco  # noqa: E402
from softteacher.data.images import load_image  # noqa: E402
from softteacher.data.ray_stream import (  # noqa: E402
    LABELED_ROW_SCHEMA,
    UNLABELED_ROW_SCHEMA,
    AugmentActor,
    ShardTooSmallError,
    StepBatches,
    labeled_dataset,
    labeled_samples,
    unlabeled_dataset,
    unlabeled_samples,
)
from softteacher.data.shards import ShardSet, write_shards  # noqa: E402
from softteacher.data.synthetic import generate_synthetic_coco  # noqa: E402
from softteacher.data.transforms import labeled_sample, unlabeled_sample  # noqa: E402

pytestmark = pytest.mark.ray

TINY = SyntheticConfig(num_train=24, num_val=4, min_size=64, max_size=96, num_classes=4)
AUGMENT = AugmentConfig(train_sizes=(64, 96), max_size=160)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, address="local", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    root = generate_synthetic_coco(tmp_path_factory.mktemp("synthetic"), TINY).root
    return load_coco(root / "instances_train.json", root / "train")


@pytest.fixture(scope="module")
def shard_set(synthetic, tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return write_shards(synthetic, tmp_path_factory.mktemp("shards"), rows_per_shard=8)


def test_actor_rows_round_trip_to_the_samples_transforms_make(ray_cluster, synthetic, shard_set):
    """Same generator, same views: the Arrow rows lose nothing on the way to collate."""
    batch = pq.read_table(shard_set.files[0]).slice(0, 3)
    records = {r.image_id: r for r in synthetic.records}
    originals = [records[i] for i in batch.column("image_id").to_pylist()]

    for kind, schema in (("labeled", LABELED_ROW_SCHEMA), ("unlabeled", UNLABELED_ROW_SCHEMA)):
        actor = AugmentActor(kind, AUGMENT, seed=5, shards_root=str(shard_set.root))
        rows = actor.augment(batch)
        assert rows.schema.equals(schema)
        rng = np.random.default_rng((5, os.getpid(), 0))  # outside an actor the key is the pid
        for record, got in zip(
            originals,
            labeled_samples(rows) if kind == "labeled" else unlabeled_samples(rows),
            strict=True,
        ):
            image = load_image(synthetic.image_path(record))
            if kind == "labeled":
                want = labeled_sample(record, image, AUGMENT, rng)
                np.testing.assert_array_equal(got.image, want.image)
                np.testing.assert_array_equal(got.boxes, want.boxes)
                np.testing.assert_array_equal(got.labels, want.labels)
            else:
                want = unlabeled_sample(record, image, AUGMENT, rng)
                for name in ("weak", "strong"):
                    np.testing.assert_array_equal(
                        getattr(got, name).image, getattr(want, name).image
                    )
                    np.testing.assert_array_equal(
                        getattr(got, name).matrix, getattr(want, name).matrix
                    )


def test_labeled_stream_repeats_and_reshuffles_each_epoch(ray_cluster, synthetic, shard_set):
    """Supervised steps (no unlabeled shard): 4 labeled images a step, 6 steps an epoch."""
    stream = StepBatches(
        labeled_dataset(shard_set, AUGMENT, seed=3, min_rows_per_epoch=1).iterator(),
        None,
        4,
        4,
        "cpu",
        seed=3,
    )
    orders: dict[int, list[int]] = {}
    for _ in range(13):  # two whole epochs and the first step of a third
        labeled = stream.labeled()
        assert len(labeled.images) == len(labeled.targets) == 4
        assert all(image.dtype == torch.float32 and image.shape[0] == 3 for image in labeled.images)
        orders.setdefault(stream.position()["labeled_epoch"], []).extend(
            stream.last_image_ids["labeled"]
        )

    assert stream.position() == {"labeled_epoch": 2, "labeled_batches_in_epoch": 1}
    all_ids = sorted(r.image_id for r in synthetic.records)
    assert sorted(orders[0]) == all_ids and sorted(orders[1]) == all_ids
    assert orders[0] != orders[1]


def test_resume_epochs_and_short_epoch_tails_are_dropped(ray_cluster, shard_set):
    """3 rows a shard: 1 labeled a step stays in one epoch, 2 unlabeled a step drop the third
    row and start a new epoch every step; ``start_epoch`` takes what ``position()`` gave."""
    batch = pq.read_table(shard_set.files[0]).slice(0, 3)
    labeled_rows = AugmentActor("labeled", AUGMENT, seed=0, shards_root="").augment(batch)
    unlabeled_rows = AugmentActor("unlabeled", AUGMENT, seed=0, shards_root="").augment(batch)
    stream = StepBatches(
        ray.data.from_arrow(labeled_rows).iterator(),
        ray.data.from_arrow(unlabeled_rows).iterator(),
        1,
        2,
        "cpu",
        seed=0,
        start_epoch={"labeled_epoch": 4, "unlabeled_epoch": 7},
    )
    positions = []
    for _ in range(3):
        labeled, unlabeled = stream.labeled(), stream.unlabeled()
        assert len(labeled.images) == 1 and len(unlabeled.weak) == len(unlabeled.strong) == 2
        positions.append(stream.position())

    assert [(p["labeled_epoch"], p["labeled_batches_in_epoch"]) for p in positions] == [
        (4, 1),
        (4, 2),
        (4, 3),
    ]
    assert [(p["unlabeled_epoch"], p["unlabeled_batches_in_epoch"]) for p in positions] == [
        (7, 1),
        (8, 1),
        (9, 1),
    ]


def test_a_shard_smaller_than_a_step_fails_instead_of_hanging(ray_cluster):
    stream = StepBatches(ray.data.range(3).iterator(), None, 4, 4, "cpu", seed=0)
    with pytest.raises(ShardTooSmallError, match="has 3 rows, fewer than the 4"):
        stream.labeled()


def test_an_undecodable_image_surfaces_with_its_file_name(ray_cluster, synthetic, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    victim = synthetic.records[2].file_name
    for record in synthetic.records[:4]:
        data = synthetic.image_path(record).read_bytes()
        (images / record.file_name).write_bytes(data[:200] if record.file_name == victim else data)
    small = dataclasses.replace(synthetic, image_root=images, records=synthetic.records[:4])
    broken = write_shards(small, tmp_path / "shards")

    stream = StepBatches(
        unlabeled_dataset(broken, AUGMENT, seed=0).iterator(), None, 1, 1, "cpu", seed=0
    )
    with pytest.raises(Exception, match=f"cannot decode image {victim}"):
        stream.labeled()


def test_two_train_workers_each_get_exactly_1_labeled_and_4_unlabeled_a_step(
    ray_cluster, synthetic, shard_set, tmp_path
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config: dict) -> None:
        """Runs in each Train worker (pickled by value; the imports it uses are installed)."""
        stream = StepBatches(
            ray.train.get_dataset_shard("labeled"),
            ray.train.get_dataset_shard("unlabeled"),
            1,
            4,
            torch.device("cpu"),
            seed=0,
        )
        steps = []
        for _ in range(config["steps"]):
            labeled, unlabeled = stream.labeled(), stream.unlabeled()
            boxes_inside = all(
                bool(
                    (t["boxes"] >= 0).all()
                    & (t["boxes"][:, 2] <= image.shape[2]).all()
                    & (t["boxes"][:, 3] <= image.shape[1]).all()
                    & (t["boxes"][:, 0] < t["boxes"][:, 2]).all()
                    & (t["boxes"][:, 1] < t["boxes"][:, 3]).all()
                )
                for image, t in zip(labeled.images, labeled.targets, strict=True)
            )
            matrices = torch.cat([unlabeled.weak_matrices, unlabeled.strong_matrices])
            steps.append(
                {
                    "labeled": len(labeled.images),
                    "labels_match_boxes": all(
                        len(t["labels"]) == len(t["boxes"]) for t in labeled.targets
                    ),
                    "boxes_inside": boxes_inside,
                    "weak": len(unlabeled.weak),
                    "strong": len(unlabeled.strong),
                    "matrices_shape": list(unlabeled.weak_matrices.shape),
                    "matrices_invertible": bool(
                        (torch.linalg.det(matrices[:, :2, :2]).abs() > 1e-6).all()
                    ),
                    "unlabeled_ids": unlabeled.image_ids,
                    "position": stream.position(),
                }
            )
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(steps))
        ray.train.report({"steps": len(steps)})

    out = tmp_path / "counts"
    out.mkdir()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"steps": 6, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={
            "labeled": labeled_dataset(shard_set, AUGMENT, seed=0, min_rows_per_epoch=1),
            "unlabeled": unlabeled_dataset(shard_set, AUGMENT, seed=0, min_rows_per_epoch=1),
        },
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name=f"s-{uuid.uuid4().hex}"),
    )
    result = trainer.fit()

    assert result.error is None  # V2 keeps metrics only beside checkpoints: read the files
    per_rank = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for steps in per_rank:
        assert len(steps) == 6
        for step in steps:
            assert (step["labeled"], step["weak"], step["strong"]) == (1, 4, 4), step
            assert step["labels_match_boxes"] and step["boxes_inside"], step
            assert step["matrices_shape"] == [4, 3, 3] and step["matrices_invertible"], step
        # 12 unlabeled rows a worker: 3 steps an epoch, so the last step is in epoch 1
        assert steps[-1]["position"]["unlabeled_epoch"] == 1
    # The workers split each unlabeled epoch: together they see every image exactly once.
    first_epoch = [i for steps in per_rank for step in steps[:3] for i in step["unlabeled_ids"]]
    assert sorted(first_epoch) == sorted(r.image_id for r in synthetic.records)
