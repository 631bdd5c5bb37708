"""Where a sweep's MLflow store lives and keeps its artifacts.

Ray workers run in their own working directories, so a store is named by an absolute URI,
and a local sqlite store keeps its artifacts in a folder beside its db, not in MLflow's
default ``./mlruns`` of whichever process opened it first.
"""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACTS_DIR = "mlartifacts"  # beside a local sqlite store's db


class TrackingError(RuntimeError):
    """The MLflow store cannot be used as asked (deleted experiment, moved store, unusable
    run name)."""


def default_tracking_uri(results_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set; otherwise an absolute sqlite URI in ``results_dir``.

    Absolute because Ray workers run in their own working directories.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def check_artifacts_beside_the_store(recorded: str, tracking_uri: str) -> None:
    """A local store keeps its artifacts beside its db (:func:`artifact_location`), and MLflow
    records that folder (``recorded``, an experiment's) as an absolute path: a results
    folder moved or copied elsewhere would go on writing its runs' artifacts into the old
    one."""
    expected = artifact_location(tracking_uri)
    if expected is None or recorded == expected:
        return
    if not recorded.rstrip("/").endswith("/" + ARTIFACTS_DIR):
        return  # a store whose experiments were made elsewhere, with artifacts of their own
    old = recorded.rstrip("/").removeprefix("file://").removesuffix("/" + ARTIFACTS_DIR)
    raise TrackingError(
        f"{tracking_uri} was moved or copied from {old}: MLflow keeps its runs' artifacts "
        f"there, so this sweep would write into {old}; move the folder back, or log to a new "
        "store (MLFLOW_TRACKING_URI=sqlite:///<folder>/mlflow.db: the sweep logs its finished "
        "trials there again from Ray's results and resumes the others)"
    )


def artifact_location(tracking_uri: str) -> str | None:
    """``file://<db folder>/mlartifacts`` for a local sqlite store, else the server's default.

    MLflow's own default for sqlite is ./mlruns of whatever directory the process was in when
    it first opened the store, which differs between Ray workers.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return None
    db_file = Path(tracking_uri[len(prefix) :].split("?", 1)[0]).resolve()
    return (db_file.parent / ARTIFACTS_DIR).as_uri()
