"""The Ray Data stream: the rows the in-process stream makes, in the plan's order, whatever
the number of actors; exact 1:4 steps for each of two workers; one-line failures."""

from __future__ import annotations

import dataclasses
import signal
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.train
import torch

from softteacher.data.coco import load_coco
from softteacher.data.ray_stream import RayRowStream
from softteacher.data.rows import StreamPlan
from softteacher.data.shards import write_shards
from softteacher.data.steps import LocalRowStream
from softteacher.presets import preset

pytestmark = pytest.mark.ray
AUGMENT = preset("smoke").augment


def _plan(shards, kind: str, seed: int = 3, rank: int = 0, world: int = 1) -> StreamPlan:
    return StreamPlan(kind, shards.num_rows, seed, rank, world)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "actors"), [("labeled", (1, 1)), ("unlabeled", (2, 2))])
def test_ray_rows_are_the_in_process_rows_for_any_number_of_actors(
    ray_cluster, smoke_fold, kind, actors
):
    """Two epochs and a bit, cut into uneven takes across two windows, from one actor and
    from two racing each other."""
    shards = smoke_fold.unlabeled
    cfg = AUGMENT
    plan = _plan(shards, kind)
    n = 2 * shards.num_rows + 5
    local = LocalRowStream(shards, plan, cfg).take(n)
    stream = RayRowStream(
        shards,
        plan,
        cfg,
        stop=n,
        concurrency=actors,
        window_rows=64,
        segment_rows=3,
        head_rows=0,  # every row from the actors
    )
    got = [stream.take(k) for k in (1, 7, 4, n - 12)]
    assert stream.position == n
    assert pa.concat_tables(got).equals(local)


def test_the_head_made_in_process_joins_the_actors_rows_seamlessly(
    ray_cluster, smoke_fold, monkeypatch
):
    """The first rows come from this process while the actors start, the rest from the
    actors, from a resumed position, with a head that ends mid-segment: the same rows."""
    from softteacher.data import ray_stream

    made_here: list[tuple[int, int]] = []

    class RecordedRows(ray_stream.AugmentedRows):  # the actors' processes keep the real one
        def rows(self, start: int, stop: int) -> pa.Table:
            made_here.append((start, stop))
            return super().rows(start, stop)

    monkeypatch.setattr(ray_stream, "AugmentedRows", RecordedRows)
    shards = smoke_fold.unlabeled
    plan = _plan(shards, "unlabeled")
    start, n = 5, shards.num_rows + 9
    local = LocalRowStream(shards, plan, AUGMENT, start=start).take(n)
    stream = RayRowStream(
        shards, plan, AUGMENT, start=start, stop=start + n, segment_rows=3, head_rows=7
    )
    got = [stream.take(k) for k in (2, 6, n - 8)]
    assert stream.position == start + n
    assert pa.concat_tables(got).equals(local)
    assert made_here == [(5, 8), (8, 11), (11, 12)]


def test_a_negative_head_is_refused(smoke_fold):
    shards = smoke_fold.labeled
    with pytest.raises(ValueError, match="head_rows must be 0 or more"):
        RayRowStream(shards, _plan(shards, "labeled"), AUGMENT, stop=4, head_rows=-1)


def test_a_data_actor_killed_mid_stream_is_replaced_and_the_rows_stay_the_same(
    ray_cluster, smoke_fold
):
    """SIGKILL of the stream's one Data actor while it has work left: Ray Data restarts the
    actor and retries its task, and the rows are still the in-process rows, in order (a row
    depends on its position only, never on the actor that made it)."""
    shards = smoke_fold.unlabeled
    plan = _plan(shards, "unlabeled")
    n = 10 * shards.num_rows  # seconds of work: the actor is still busy when it is killed
    local = LocalRowStream(shards, plan, AUGMENT).take(n)
    stream = RayRowStream(
        shards,
        plan,
        AUGMENT,
        stop=n,
        concurrency=(1, 1),
        window_rows=n,
        segment_rows=3,
        head_rows=0,
    )
    first = stream.take(7)
    (actor,) = _data_actors()
    actor.send_signal(signal.SIGKILL)
    after = stream.take(7)
    deadline = time.monotonic() + 60
    while not [a for a in _data_actors() if a.pid != actor.pid]:  # its replacement
        assert time.monotonic() < deadline, "no Data actor replaced the killed one"
        time.sleep(0.5)
    rest = stream.take(n - 14)
    assert pa.concat_tables([first, after, rest]).equals(local)


def test_a_closed_stream_ends_its_actors_and_refuses_rows(ray_cluster, smoke_fold):
    """A run that stops early (a failed step) closes its streams: the stream's threads end,
    its Data actor process exits and its CPU share is free again, for the retry in the same
    process, long before the rows it planned are made."""
    shards = smoke_fold.unlabeled
    free_before = ray.available_resources().get("CPU", 0.0)
    n = 50 * shards.num_rows  # a minute of work: the stream is mid-way when closed
    stream = RayRowStream(
        shards, _plan(shards, "unlabeled"), AUGMENT, stop=n, concurrency=(1, 1), segment_rows=3
    )
    stream.take(7)
    (actor,) = _data_actors()
    assert stream.close(timeout=60), "the stream's threads still ran 60 s after close"
    actor.wait(timeout=60)  # raises if the actor process still runs
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < free_before:
        assert time.monotonic() < deadline, "the closed stream's CPU share was not released"
        time.sleep(0.5)
    with pytest.raises(RuntimeError, match="stream was closed"):
        stream.take(1)


def _data_actors() -> list[psutil.Process]:
    """The Data actors of this test process's cluster (its raylet is a child of ours)."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.name().startswith("ray::MapWorker") and p.status() != psutil.STATUS_ZOMBIE
    ]


def test_a_stream_started_at_a_position_continues_the_same_rows(ray_cluster, smoke_fold):
    shards = smoke_fold.labeled
    cfg = AUGMENT
    plan = _plan(shards, "labeled")
    whole = LocalRowStream(shards, plan, cfg).take(3 * shards.num_rows)
    start = shards.num_rows + 2  # mid-epoch
    resumed = RayRowStream(shards, plan, cfg, start=start, stop=3 * shards.num_rows, head_rows=0)
    assert resumed.take(6).equals(whole.slice(start, 6))


def test_a_stream_asked_beyond_its_planned_rows_says_so(ray_cluster, smoke_fold):
    shards = smoke_fold.labeled
    cfg = AUGMENT
    stream = RayRowStream(shards, _plan(shards, "labeled"), cfg, stop=3)
    with pytest.raises(RuntimeError, match="asked for more rows than it planned"):
        stream.take(4)


def test_an_undecodable_image_surfaces_with_its_file_name(ray_cluster, smoke_fold, tmp_path):
    """Every image decodes when the shards are written (test_shards.py); one damaged in a
    written shard still fails the stream naming its file, not as Ray Data's UDF error."""
    fold = smoke_fold.fold
    synthetic = load_coco(fold.labeled_ann, fold.train_images)
    small = dataclasses.replace(synthetic, records=synthetic.records[:4])
    broken = write_shards(small, tmp_path / "shards")
    victim = synthetic.records[2].file_name
    table = pq.read_table(broken.files[0])
    images = table.column("image").to_pylist()
    row = table.column("file_name").to_pylist().index(victim)
    images[row] = images[row][:200]
    column = table.schema.get_field_index("image")
    damaged = table.set_column(column, "image", pa.array(images, pa.binary()))
    pq.write_table(damaged, broken.files[0])
    for head_rows in (0, 8):  # made by an actor, made in process
        stream = RayRowStream(
            broken, _plan(broken, "labeled"), AUGMENT, stop=8, head_rows=head_rows
        )
        with pytest.raises(Exception, match=f"cannot decode image {victim}"):
            stream.take(8)


@pytest.mark.slow
def test_each_of_two_workers_gets_exactly_1_labeled_and_4_unlabeled_a_step(
    ray_cluster, smoke_fold, tmp_path
):
    """Two workers of one run, each a Ray task reading its own streams at the same time (a
    Train worker builds its streams the same way; the 2-worker Ray Train run is tested in
    test_ray_train)."""
    from softteacher.run.spec import RunSpec

    # every row from the Data actors: the smoke run's rows all fit the in-process head
    cfg = preset("smoke").replace(
        method={"burn_in_steps": 0}, train={"max_steps": 7, "stream_head_rows": 0}
    )
    spec = RunSpec(
        cfg, smoke_fold.fold, smoke_fold.labeled, smoke_fold.unlabeled, "x", str(tmp_path)
    )

    def read_steps(spec, rank: int, world: int, steps: int) -> list[dict]:
        """What worker ``rank`` of ``world`` reads in its first ``steps`` 1:4 steps (a
        closure: Ray pickles it by value, the tests folder is not importable there)."""
        from softteacher.run.worker import ray_step_batches

        stream = ray_step_batches(spec, rank, world, {}, 0, torch.device("cpu"))
        read = []
        for _ in range(steps):
            labeled, unlabeled = stream.labeled(1), stream.unlabeled(4)
            boxes_inside = all(
                bool(
                    (t["boxes"] >= 0).all()
                    & (t["boxes"][:, 2] <= image.shape[2]).all()
                    & (t["boxes"][:, 3] <= image.shape[1]).all()
                )
                for image, t in zip(labeled.images, labeled.targets, strict=True)
            )
            read.append(
                {
                    "labeled": len(labeled.images),
                    "weak": len(unlabeled.weak),
                    "strong": len(unlabeled.strong),
                    "boxes_inside": boxes_inside,
                    "unlabeled_ids": unlabeled.image_ids,
                    "position": stream.position(),
                }
            )
        return read

    worker = ray.remote(num_cpus=1)(read_steps)
    per_rank = ray.get([worker.remote(spec, rank, 2, 7) for rank in (0, 1)])
    for steps in per_rank:
        assert len(steps) == 7
        for step in steps:
            assert (step["labeled"], step["weak"], step["strong"]) == (1, 4, 4), step
            assert step["boxes_inside"], step
        assert steps[-1]["position"] == {"labeled_rows": 7, "unlabeled_rows": 28}
    # Rank r's k-th row is global position 2k + r: the first n global positions are the
    # first epoch, which visits every unlabeled image exactly once.
    n = smoke_fold.unlabeled.num_rows
    assert 2 * 28 >= n
    first_epoch = [
        image_id
        for rank, steps in enumerate(per_rank)
        for k, image_id in enumerate(i for step in steps for i in step["unlabeled_ids"])
        if 2 * k + rank < n
    ]
    assert sorted(first_epoch) == sorted(set(first_epoch)) and len(first_epoch) == n
