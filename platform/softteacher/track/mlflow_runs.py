"""MLflow runs of a sweep: one parent run per sweep, one child run per trial.

Tune trial actors and Train workers log to the same store from several processes, and Ray
changes their working directory. So nothing here uses MLflow's global active-run state or a
relative path: every call names its tracking URI and run id (``RunRef``, which pickles to
any worker), and a local sqlite store keeps its artifacts next to the database.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from softteacher.names import FINAL_PREFIX
from softteacher.track.stores import (
    TrackingError,
    artifact_location,
    check_artifacts_beside_the_store,
)

_logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's experiment kind: without it the UI opens a new experiment on the GenAI
# "Overview" page (traces, latency) instead of the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# MLflow's limits (mlflow/utils/validation.py); a longer value or a larger batch is refused.
MAX_PARAM_VALUE_CHARS = 6000
MAX_KEY_CHARS = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_CUT_MARK = "...[cut]"
# Portable key characters: MLflow also takes ':' except on Windows, and '\w' beyond ASCII.
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_KEY_WORDS = {"%": "pct", "@": "_at_"}
# Concurrent writers to one sqlite file wait for its lock; past sqlite's own timeout, retry.
_LOCK_RETRIES = 5
_LOCK_FIRST_WAIT_S = 0.2

T = TypeVar("T")


@dataclass(frozen=True)
class RunRef:
    """Everything a process needs to log to one run, without MLflow's active-run state."""

    tracking_uri: str
    run_id: str
    experiment_id: str


def sanitize_key(key: str) -> str:
    """A metric/param key MLflow accepts on every OS: ``table/1%/x`` -> ``table/1pct/x``.

    Keys are also file paths in some stores, so empty, ``.`` and ``..`` segments go too.
    """
    for char, word in _KEY_WORDS.items():
        key = key.replace(char, word)
    key = _KEY_BAD_CHARS.sub("_", key)
    segments = [s for s in key.split("/") if s.strip() not in ("", ".")]
    key = "/".join("__" if s.strip() == ".." else s for s in segments)
    if not key:
        raise ValueError("an MLflow key needs at least one letter or digit")
    return key[:MAX_KEY_CHARS]


def start_parent_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    tags: Mapping[str, str] | None = None,
) -> RunRef:
    """A new sweep run in ``experiment`` (created on first use, artifacts next to the db)."""
    client = mlflow_client(tracking_uri)
    experiment_id = _experiment_id(client, tracking_uri, experiment)
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    run = with_lock_retry(client.create_run, experiment_id, run_name=run_name, tags=str_tags)
    ref = RunRef(tracking_uri, run.info.run_id, experiment_id)
    log_params(ref, params)
    return ref


def resume_parent_run(tracking_uri: str, experiment: str, run_name: str) -> RunRef | None:
    """The newest sweep run of that name, set RUNNING again; None when there is none.

    Resuming keeps an interrupted sweep's finished trials under one parent instead of two;
    rerunning a finished sweep (same settings, same name) reports into the same parent.
    """
    client = mlflow_client(tracking_uri)
    found = with_lock_retry(client.get_experiment_by_name, experiment)
    if found is None or found.lifecycle_stage != "active":
        return None
    check_artifacts_beside_the_store(found.artifact_location, tracking_uri)
    runs = _search_all(
        client,
        found.experiment_id,
        f"attributes.run_name = {_quoted(run_name)}",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if PARENT_TAG not in run.data.tags:
            with_lock_retry(client.update_run, run.info.run_id, status="RUNNING")
            return RunRef(tracking_uri, run.info.run_id, found.experiment_id)
    return None


def find_or_start_child_run(
    parent: RunRef,
    run_name: str,
    params: Mapping[str, object],
    tags: Mapping[str, str] | None = None,
) -> RunRef:
    """The trial's child run of ``parent``: found again by its stable name, or created.

    A FINISHED child is returned untouched (the caller skips the trial); an interrupted one
    is set RUNNING and gets the params it does not have yet.
    """
    client = mlflow_client(parent.tracking_uri)
    existing = _child_runs(client, parent, f"attributes.run_name = {_quoted(run_name)}")
    finished = [run for run in existing if run.info.status == "FINISHED"]
    if finished:
        return RunRef(parent.tracking_uri, finished[0].info.run_id, parent.experiment_id)
    if existing:
        run_id = existing[0].info.run_id
        with_lock_retry(client.update_run, run_id, status="RUNNING")
    else:
        all_tags = {**{k: str(v) for k, v in (tags or {}).items()}, PARENT_TAG: parent.run_id}
        run = with_lock_retry(
            client.create_run, parent.experiment_id, run_name=run_name, tags=all_tags
        )
        run_id = run.info.run_id
    child = RunRef(parent.tracking_uri, run_id, parent.experiment_id)
    log_params(child, params)
    return child


def find_child_run(parent: RunRef, run_name: str) -> RunRef | None:
    """The latest child run of ``parent`` named ``run_name``, if any."""
    existing = _child_runs(
        mlflow_client(parent.tracking_uri), parent, f"attributes.run_name = {_quoted(run_name)}"
    )
    if not existing:
        return None
    return RunRef(parent.tracking_uri, existing[-1].info.run_id, parent.experiment_id)


def _child_runs(client: MlflowClient, parent: RunRef, condition: str) -> list:
    """``parent``'s children that meet ``condition`` (a search filter), oldest first."""
    return _search_all(
        client,
        parent.experiment_id,
        f"tags.`{PARENT_TAG}` = {_quoted(parent.run_id)} and {condition}",
        order_by=["attributes.start_time ASC"],
    )


@contextmanager
def system_metrics(run: RunRef, interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk,
    network; GPU where present) logged to ``run`` every ``interval_s`` while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run.run_id,
        sampling_interval=interval_s,
        resume_logging=True,  # a resumed trial goes on at the next step
        tracking_uri=run.tracking_uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_params(run: RunRef, params: Mapping[str, object]) -> None:
    """Log the params the run does not have yet (MLflow refuses to change a logged one).

    A resumed run whose value differs keeps the first value, and the new one is recorded as
    tag ``changed_on_resume/<key>`` with a warning, so a mixed run is visible, not fatal.
    """
    client = mlflow_client(run.tracking_uri)
    logged = with_lock_retry(client.get_run, run.run_id).data.params
    wanted = {sanitize_key(k): _param_value(v) for k, v in params.items()}
    new = [Param(k, v) for k, v in wanted.items() if k not in logged]
    changed = {k: v for k, v in wanted.items() if k in logged and logged[k] != v}
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        batch = new[start : start + MAX_PARAMS_PER_BATCH]
        with_lock_retry(client.log_batch, run.run_id, params=batch)
    if changed:
        _logger.warning(
            "run %s keeps its first values of params %s; new values are in tags "
            "changed_on_resume/<key>",
            run.run_id,
            sorted(changed),
        )
        set_tags(run, {f"changed_on_resume/{k}": v for k, v in changed.items()})


def set_tags(run: RunRef, tags: Mapping[str, object]) -> None:
    """Tags can change over a run's life (unlike params): checkpoint paths, trial state."""
    client = mlflow_client(run.tracking_uri)
    for key, value in tags.items():
        with_lock_retry(client.set_tag, run.run_id, key, _param_value(value))


def last_logged_steps(run: RunRef, keys: Sequence[str]) -> dict[str, int]:
    """The last step at which ``run`` logged each of ``keys`` (left out: never logged).

    A restarted worker replays the steps since its checkpoint; the run is deterministic, so
    its first attempt logged the same values already and the replay must not log them twice.
    """
    client = mlflow_client(run.tracking_uri)
    steps = {}
    for key in keys:
        history = with_lock_retry(client.get_metric_history, run.run_id, sanitize_key(key))
        if history:
            steps[key] = max(m.step for m in history)
    return steps


def log_metrics(run: RunRef, metrics: Mapping[str, float], step: int) -> None:
    """Log one step's metrics in batches; NaN/inf values are skipped (a diverged loss must
    not stop the trial's logging), with a debug message."""
    timestamp_ms = int(time.time() * 1000)
    entries = []
    for key, value in metrics.items():
        number = float(value)
        if not math.isfinite(number):
            _logger.debug("run %s step %d: skipped non-finite %s=%s", run.run_id, step, key, value)
            continue
        entries.append(Metric(sanitize_key(key), number, timestamp_ms, int(step)))
    client = mlflow_client(run.tracking_uri)
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        batch = entries[start : start + MAX_METRICS_PER_BATCH]
        with_lock_retry(client.log_batch, run.run_id, metrics=batch)


def log_final_metrics(run: RunRef, metrics: Mapping[str, float], step: int = 0) -> None:
    """End-of-trial metrics under ``final/`` (``teacher/AP`` -> ``final/teacher/AP``), so they
    never mix with the step curves of the same name."""
    log_metrics(run, {FINAL_PREFIX + key: value for key, value in metrics.items()}, step)


def log_json_artifact(
    run: RunRef, name: str, payload: Mapping, artifact_path: str | None = None
) -> None:
    """Write ``payload`` as ``name`` (``.json`` added when missing) among the run's artifacts."""
    if not name or Path(name).name != name:
        raise ValueError(f"artifact name {name!r} must be a plain file name; use artifact_path")
    file_name = name if name.endswith(".json") else f"{name}.json"
    with tempfile.TemporaryDirectory(prefix="softteacher-artifact-") as tmp:
        local = Path(tmp) / file_name
        local.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        log_file_artifact(run, local, artifact_path)


def log_file_artifact(run: RunRef, path: Path, artifact_path: str | None = None) -> None:
    """Copy a local file into the run's artifacts (the path is resolved before Ray moves on)."""
    client = mlflow_client(run.tracking_uri)
    local = str(Path(path).resolve())
    with_lock_retry(client.log_artifact, run.run_id, local, artifact_path)


def finish_run(run: RunRef, status: str = "FINISHED") -> None:
    """End the run as FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status {status!r} is not one of FINISHED, FAILED, KILLED")
    client = mlflow_client(run.tracking_uri)
    with_lock_retry(client.set_terminated, run.run_id, status=status)


def finish_running_children(parent: RunRef, status: str) -> list[str]:
    """End ``parent``'s children that are still RUNNING with ``status``: trials whose
    process went down with the driver cannot end their own runs. Returns their names."""
    running = _child_runs(
        mlflow_client(parent.tracking_uri), parent, "attributes.status = 'RUNNING'"
    )
    for run in running:
        finish_run(RunRef(parent.tracking_uri, run.info.run_id, parent.experiment_id), status)
    return [run.info.run_name for run in running]


def ended_since(run: RunRef, since_ms: int) -> str | None:
    """The run's status if it ended (FINISHED, FAILED, KILLED) at ``since_ms`` (epoch
    milliseconds) or later, else None: a run still going, or one that ended before."""
    info = with_lock_retry(mlflow_client(run.tracking_uri).get_run, run.run_id).info
    status = _status_name(info.status)
    if status in ("FINISHED", "FAILED", "KILLED") and (info.end_time or 0) >= since_ms:
        return status
    return None


def run_status(run: RunRef) -> str:
    """RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
    client = mlflow_client(run.tracking_uri)
    return _status_name(with_lock_retry(client.get_run, run.run_id).info.status)


def _status_name(status: str | int) -> str:
    """MLflow hands a run's status as a name or as its enum value, by store."""
    return status if isinstance(status, str) else RunStatus.to_string(status)


@functools.lru_cache(maxsize=8)
def mlflow_client(tracking_uri: str) -> MlflowClient:
    """One client (and one sqlite engine) per URI and process."""
    return MlflowClient(tracking_uri)


def _experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """Get or create the experiment; a concurrent creator winning the race is fine."""
    found = with_lock_retry(client.get_experiment_by_name, name)
    if found is None:
        try:
            return with_lock_retry(
                client.create_experiment,
                name,
                artifact_location=artifact_location(tracking_uri),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    check_artifacts_beside_the_store(found.artifact_location, tracking_uri)
    if found.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} in {tracking_uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) "
            "or choose another experiment name"
        )
    return found.experiment_id


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str, order_by):
    """Every match, page by page (a sweep can have more children than one page)."""
    runs, token = [], None
    while True:
        page = with_lock_retry(
            client.search_runs, [experiment_id], filter_string, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quoted(value: str) -> str:
    """A search-filter string literal; MLflow's filter grammar has no escapes."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"run name {value!r} has both quote kinds; MLflow cannot search for it")


def _param_value(value: object) -> str:
    text = str(value)
    if len(text) <= MAX_PARAM_VALUE_CHARS:
        return text
    return text[: MAX_PARAM_VALUE_CHARS - len(_CUT_MARK)] + _CUT_MARK


def with_lock_retry(call: Callable[..., T], *args, **kwargs) -> T:
    """``call(*args, **kwargs)``, retried while another process holds the sqlite write lock.

    MLflow already waits 20 s for the lock; sqlite still fails at once when two readers both
    try to upgrade to writers, which many trials logging at the same time can hit.
    """
    wait_s = _LOCK_FIRST_WAIT_S
    for _ in range(_LOCK_RETRIES):
        try:
            return call(*args, **kwargs)
        except MlflowException as error:
            if "database is locked" not in str(error):
                raise
            _logger.info("MLflow store locked by another writer; retrying in %.1f s", wait_s)
            time.sleep(wait_s)
            wait_s *= 2
    return call(*args, **kwargs)
