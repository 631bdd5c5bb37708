"""Fixtures shared across test files: the smoke fold with its shards, one loopback Ray
cluster for the Ray tests, and a MLflow store on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import ray  # noqa: E402

from softteacher.data.protocol import FoldData, synthetic_folds  # noqa: E402
from softteacher.data.shards import ShardSet, write_shards  # noqa: E402
from softteacher.presets import preset  # noqa: E402

RAY_TEST_CPUS = 4


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
        ray.init(
            num_cpus=RAY_TEST_CPUS,
            include_dashboard=False,
            address="local",
            log_to_driver=False,
        )


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
