"""Ray Train on loopback: a run is reproducible (same seed, same losses and weights, even
with the CPU contended, and after its worker is killed and restarted from its checkpoint),
the in-process runner is the same run (and resumes the same way after a stop), and two
simulated nodes each get one worker of a 2-worker run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from softteacher.names import LOSS_TOTAL as LOSS
from softteacher.names import TEACHER_AP
from softteacher.presets import preset
from softteacher.run.fit import RunResult, run
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.track.mlflow_runs import RunRef, start_parent_run
from softteacher.track.provenance import cpu_description
from softteacher.train.checkpoint import CHECKPOINT_FILE

pytestmark = pytest.mark.ray
ONE_WORKER = WorkerResources(num_workers=1, cpus_per_worker=1)


def _run(
    smoke_fold,
    tmp_path: Path,
    name: str,
    *,
    max_steps: int = 8,
    seed: int = 0,
    resources: WorkerResources = ONE_WORKER,
    tracking: RunRef | None = None,
) -> tuple[RunResult, list[float], RunRef]:
    """A smoke run (burn-in 4 steps, then 1 labeled + 4 unlabeled); its loss at each step."""
    cfg = preset("smoke").replace(
        train={
            "max_steps": max_steps,
            "ckpt_every": 100,  # checkpoints at the end of burn-in and at the end only
            "log_every": 1,
            "eval_every": 100,
            "seed": seed,
        }
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = tracking or start_parent_run(uri, "tests", name, {})
    spec = RunSpec(
        cfg,
        smoke_fold.fold,
        smoke_fold.labeled,
        smoke_fold.unlabeled,
        name=name,
        storage_path=str(tmp_path / "train"),
        resources=resources,
        tracking=tracking,
    )
    result = run(spec)
    history = MlflowClient(uri).get_metric_history(tracking.run_id, LOSS)
    return result, [m.value for m in sorted(history, key=lambda m: m.step)], tracking


def _weights_digest(result: RunResult) -> str:
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state["student"]):
        digest.update(key.encode())
        digest.update(state["student"][key].cpu().numpy().tobytes())
    return digest.hexdigest()


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not math.isnan(v)}  # APl of tiny objects


IN_PROCESS = WorkerResources(num_workers=0, cpus_per_worker=1)


@dataclass(frozen=True)
class Reference:
    """The uninterrupted in-process run the stopped and resumed runs must equal."""

    losses: list[float]
    weights: str
    metrics: dict[str, float]


@pytest.fixture
def reference(ray_cluster, smoke_fold, tmp_path_factory) -> Reference:
    """Made in each test that needs it: under xdist the two tests run in two processes."""
    threads = torch.get_num_threads()
    try:
        result, losses, _ = _run(
            smoke_fold, tmp_path_factory.mktemp("reference"), "reference", resources=IN_PROCESS
        )
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 8 and len(set(losses)) > 1
    return Reference(losses, _weights_digest(result), _comparable(result.metrics))


def test_same_seed_same_run_after_a_stop_in_process(reference, smoke_fold, tmp_path):
    """Stopped at step 5 and resumed from its checkpoint (the same run name), in process."""
    threads = torch.get_num_threads()
    try:
        part, head, _ = _run(smoke_fold, tmp_path, "in-process", max_steps=5, resources=IN_PROCESS)
        kept = sorted(p.name for p in (tmp_path / "train" / "in-process").glob("checkpoint_*"))
        rest, resumed, _ = _run(smoke_fold, tmp_path, "in-process", resources=IN_PROCESS)
    finally:
        torch.set_num_threads(threads)
    assert kept == ["checkpoint_000000004", "checkpoint_000000005"]
    assert head == reference.losses[:5]
    assert head + resumed == reference.losses  # the resumed run logs steps 6-8 only
    assert _weights_digest(rest) == reference.weights
    assert _comparable(rest.metrics) == reference.metrics


def _lowest_priority() -> None:
    os.nice(19)


def _kill_the_train_worker_after(step: int, tracking: RunRef, done: threading.Event) -> list:
    """SIGKILL this test's Ray Train worker once its run has logged ``step``; returns the
    killed process in a list (a thread's result)."""
    killed: list[psutil.Process] = []

    def watch() -> None:
        client = MlflowClient(tracking.tracking_uri)
        while not done.is_set() and not killed:
            try:  # the worker writes the same sqlite store: a locked read is tried again
                history = client.get_metric_history(tracking.run_id, LOSS)
            except MlflowException:
                history = []
            if any(m.step >= step for m in history):
                for process in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "RayTrainWorker" in " ".join(process.cmdline()):
                            process.kill()
                            killed.append(process)
                            return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    return killed


@pytest.mark.slow
def test_same_seed_same_run_on_ray_train_on_a_busy_machine_after_a_killed_worker(
    reference, smoke_fold, tmp_path
):
    """On Ray Train, with another process hogging a core, its worker SIGKILLed after step 5:
    Ray Train restarts it from the step-4 checkpoint, the replayed steps are not logged a
    second time, and the run ends as the uninterrupted in-process run did, loss for loss,
    weight for weight, metric for metric, with one final evaluation in its MLflow run."""
    tracking = start_parent_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "tests", "killed", {})
    done = threading.Event()
    killed = _kill_the_train_worker_after(5, tracking, done)
    # at the lowest priority: it takes every idle cycle, so actors and threads run at other
    # times than on a quiet machine, without slowing the suite's other process as much
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=_lowest_priority)
    try:
        restartable = dataclasses.replace(ONE_WORKER, max_failures=1)
        result, losses, _ = _run(
            smoke_fold, tmp_path, "killed", resources=restartable, tracking=tracking
        )
    finally:
        done.set()
        hog.kill()
    assert killed, "the run ended before its worker could be killed"
    client = MlflowClient(tracking.tracking_uri)
    steps = [m.step for m in client.get_metric_history(tracking.run_id, LOSS)]
    assert sorted(steps) == list(range(1, 9))  # each step once, the replayed 5-8 included
    assert losses == reference.losses
    assert len(client.get_metric_history(tracking.run_id, TEACHER_AP)) == 1
    assert _weights_digest(result) == reference.weights
    assert _comparable(result.metrics) == reference.metrics


@pytest.mark.slow
def test_two_workers_spread_over_two_nodes(smoke_fold, tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # this test needs a cluster of its own; the next Ray test restarts one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        resources = WorkerResources(
            num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD"
        )
        result, _, tracking = _run(smoke_fold, tmp_path, "spread", max_steps=3, resources=resources)
        assert result.checkpoint is not None
        tags = MlflowClient(tracking.tracking_uri).get_run(tracking.run_id).data.tags
        nodes = {tags["worker/0/node_id"], tags["worker/1/node_id"]}
        assert len(nodes) == 2
        assert nodes == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert tags["worker/0/cpu"] == tags["worker/1/cpu"] == cpu_description()
    finally:
        ray.shutdown()
        cluster.shutdown()
