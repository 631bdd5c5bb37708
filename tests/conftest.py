"""Fixtures shared across test files: the smoke fold with its shards, one loopback Ray
cluster for the Ray tests, a head node with its dashboard as ``ray start`` makes one, and a
MLflow store on disk."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

from softteacher.data.protocol import FoldData, synthetic_folds  # noqa: E402
from softteacher.data.shards import ShardSet, write_shards  # noqa: E402
from softteacher.presets import preset  # noqa: E402
from softteacher.tune.cluster import sweep_env  # noqa: E402

RAY_TEST_CPUS = 4
GRACE_S = 5  # for a head node's processes to stop on SIGTERM


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first, in their files' order: under ``--dist load`` (the
    Makefile's) the two processes take them one at a time while the short tests fill the
    gaps after, instead of one process ending the run alone on a two-minute test it got
    last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@dataclass(frozen=True)
class SmokeFold:
    """The smoke preset's 10% fold 1 and its shards, made once a session."""

    fold: FoldData
    labeled: ShardSet
    unlabeled: ShardSet
    root: Path


@pytest.fixture(scope="session")
def smoke_fold(tmp_path_factory: pytest.TempPathFactory) -> SmokeFold:
    root = tmp_path_factory.mktemp("smoke-data")
    fold = synthetic_folds(root, preset("smoke").synthetic, [10], [1])[0]
    labeled, unlabeled, _ = fold.load()
    return SmokeFold(
        fold, write_shards(labeled, root / "shards"), write_shards(unlabeled, root / "shards"), root
    )


@pytest.fixture(scope="session")
def _ray_session():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session) -> None:
    """One loopback cluster for every Ray test (started on first use, kept until the end:
    starting one costs seconds); a test that needs its own shuts this one down first."""
    if not ray.is_initialized():
        # smoke trials last seconds: MLflow's system metrics sample every second, as in the
        # sweep commands the tests start (test_sweep._sweep_env); the workers inherit it
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
        # Ray Train as a sweep's own cluster runs it (its controller reads these from the
        # driver's environment): workers polled every 0.5 s, no preemption watcher
        os.environ.update(sweep_env(joins=False))
        ray.init(
            num_cpus=RAY_TEST_CPUS,
            include_dashboard=False,
            address="local",
            log_to_driver=False,
        )


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class HeadNode:
    """A local head node started by ``ray start --head``: where to join it, its dashboard,
    its session folder (logs, the Prometheus scrape config) and its authentication token."""

    gcs_address: str
    dashboard_url: str
    session_dir: Path
    auth_token: str

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver that joins this node with its token."""
        return os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}


@pytest.fixture(scope="module")
def ray_head_node() -> Iterator[HeadNode]:
    """On free ports (another cluster on the machine may hold the default ones) and a temp
    folder of its own (a short path: Ray's socket paths must stay under 108 characters),
    stopped with its processes at the end (``--block`` stops them when it exits).

    Token authentication is always on, with a token of its own: ``ray start`` turns it on
    only when ``~/.ray/auth_token`` exists, which depends on what ran before."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    auth_token = uuid.uuid4().hex
    gcs_port, dashboard_port = free_port(), free_port()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
            "--disable-usage-stats",
        ],
        stdout=(temp_dir / "ray_start.log").open("w"),
        stderr=subprocess.STDOUT,
        # metrics reported every 2 s instead of 10, so that a test sees a gauge sooner
        env=os.environ
        | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": auth_token,
            "RAY_metrics_report_interval_ms": "2000",
        },
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:  # up once the dashboard answers (401 without the token is an answer)
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert head.poll() is None, (temp_dir / "ray_start.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the head node's dashboard did not come up"
            time.sleep(1.0)
    try:
        yield HeadNode(
            f"127.0.0.1:{gcs_port}", url, (temp_dir / "session_latest").resolve(), auth_token
        )
    finally:
        # ``ray stop`` would stop every cluster on the machine (another test process's too);
        # the node's own processes get SIGTERM through ``--block``, then SIGKILL after a
        # grace period (its dashboard agents wait ~30 s on the gone GCS otherwise)
        processes = psutil.Process(head.pid).children(recursive=True)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=60)
        _, alive = psutil.wait_procs(processes, timeout=GRACE_S)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
