"""Ray Train on loopback: a stopped run resumes at its step; two simulated nodes each get
one worker of a 2-worker run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from softteacher.config import preset
from softteacher.data.protocol import synthetic_folds
from softteacher.data.ray_stream import labeled_dataset, unlabeled_dataset
from softteacher.data.shards import write_shards
from softteacher.track.mlflow_runs import start_parent_run
from softteacher.train.ray_worker import WorkerJob, WorkerResources, build_torch_trainer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fold_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = preset("smoke")
    fold = synthetic_folds(root, cfg.synthetic, [10], [1])[0]
    labeled, unlabeled, _ = fold.load()
    return fold, write_shards(labeled, root / "shards"), write_shards(unlabeled, root / "shards")


def _fit(fold_shards, tmp_path, *, max_steps, resources, run_name="run"):
    fold, labeled, unlabeled = fold_shards
    cfg = preset("smoke").replace(
        train={"max_steps": max_steps, "ckpt_every": 2, "log_every": 1, "eval_every": 100}
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = start_parent_run(uri, "tests", run_name, {})
    job = WorkerJob(cfg, str(fold.val_ann), str(fold.val_images), 1, tracking=run)
    datasets = {
        "labeled": labeled_dataset(labeled, cfg.augment, seed=0),
        "unlabeled": unlabeled_dataset(unlabeled, cfg.augment, seed=1),
    }
    trainer = build_torch_trainer(
        job, resources, datasets, run_name=run_name, storage_path=tmp_path / "train"
    )
    return trainer.fit(), MlflowClient(uri), run


def test_a_stopped_run_resumes_at_its_last_checkpoint(fold_shards, tmp_path):
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        resources = WorkerResources(num_workers=1, cpus_per_worker=1)
        first, client, run = _fit(fold_shards, tmp_path, max_steps=4, resources=resources)
        assert first.checkpoint is not None
        steps = [m.step for m in client.get_metric_history(run.run_id, "loss/total")]
        assert steps == [1, 2, 3, 4]
        # the same run name in the same storage: Ray Train restores the latest checkpoint
        second, client, run = _fit(fold_shards, tmp_path, max_steps=7, resources=resources)
        steps = [m.step for m in client.get_metric_history(run.run_id, "loss/total")]
        assert steps == [5, 6, 7]  # continued from step 4, did not start over
        assert second.metrics["checkpoint_step"] == 7
    finally:
        ray.shutdown()


LOCAL_MODE_RUN = """
import sys, tempfile
import subprocess
import sys
from pathlib import Path
import ray
from softteacher.config import preset
from softteacher.data.protocol import synthetic_folds
from softteacher.data.ray_stream import labeled_dataset, unlabeled_dataset
from softteacher.data.shards import write_shards
from softteacher.train.ray_worker import WorkerJob, WorkerResources, build_torch_trainer
root = Path(sys.argv[1])
cfg = preset("smoke").replace(train={"max_steps": 3, "ckpt_every": 3, "eval_every": 3})
fold = synthetic_folds(root, cfg.synthetic, [10], [1])[0]
labeled, unlabeled, _ = fold.load()
ray.init(num_cpus=4, include_dashboard=False)
job = WorkerJob(cfg, str(fold.val_ann), str(fold.val_images), 1)
datasets = {
    "labeled": labeled_dataset(write_shards(labeled, root / "s"), cfg.augment, seed=0),
    "unlabeled": unlabeled_dataset(write_shards(unlabeled, root / "s"), cfg.augment, seed=1),
}
result = build_torch_trainer(
    job, WorkerResources(num_workers=0), datasets, run_name="local", storage_path=root / "t"
).fit()
print("checkpoint_step", result.metrics["checkpoint_step"], "teacher/AP" in result.metrics)
"""


def test_local_mode_runs_the_same_loop_in_process(tmp_path):
    # A fresh interpreter: local mode trains inside the driver process, and a driver that
    # already started and stopped Ray sessions (the other tests) aborted when it did.
    done = subprocess.run(
        [sys.executable, "-c", LOCAL_MODE_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint_step 3 True" in done.stdout


def test_two_workers_spread_over_two_nodes(fold_shards, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        resources = WorkerResources(
            num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD"
        )
        result, client, run = _fit(fold_shards, tmp_path, max_steps=3, resources=resources)
        assert result.error is None
        tags = client.get_run(run.run_id).data.tags
        nodes = {tags["worker/0/node_id"], tags["worker/1/node_id"]}
        assert len(nodes) == 2
        assert nodes == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
