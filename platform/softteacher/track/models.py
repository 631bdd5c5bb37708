"""A trial's final teacher as an MLflow 3 LoggedModel, its mAP linked to the model.

The sweep's best model is then found with ``mlflow.search_logged_models`` ordered by
``final/teacher/AP``, and loaded by its ``models:/m-<id>`` URI, without knowing which run
or Ray checkpoint folder it came from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import LoggedModelOutput, Metric

from softteacher.names import FINAL_PREFIX
from softteacher.track.datasets import DataSplit
from softteacher.track.mlflow_runs import (
    RunRef,
    mlflow_client,
    sanitize_key,
    with_lock_retry,
)

MODEL_TYPE = "softteacher-faster-rcnn-teacher"
# characters MLflow refuses in a model name (a trial's ``cls0.7`` has one)
_NAME_BAD_CHARS = re.compile(r"[/:.%\"']")


def model_name(trial_name: str) -> str:
    """The trial's name as MLflow accepts it for a model: ``r10-f1-...-cls0_7-reg0_02``."""
    return _NAME_BAD_CHARS.sub("_", trial_name).strip() or "teacher"


def log_logged_model(
    run: RunRef,
    name: str,
    folder: Path,
    final_metrics: Mapping[str, float],
    trained_steps: int,
    evaluated_on: DataSplit | None = None,
    params: Mapping[str, object] | None = None,
) -> str:
    """Log ``folder``'s files as a READY LoggedModel of ``run`` named after ``name``, the
    output of the run at ``trained_steps``. ``final_metrics`` are logged as the run's
    ``final/<key>`` metrics (in place of ``log_final_metrics``), linked to the model and to
    the ``evaluated_on`` dataset. Returns the model id (``models:/<id>`` loads it).

    A failed upload leaves the model FAILED, never PENDING, so a search for READY models
    finds only loadable ones.
    """
    client = mlflow_client(run.tracking_uri)
    model = with_lock_retry(
        client.create_logged_model,
        run.experiment_id,
        name=model_name(name),
        source_run_id=run.run_id,
        params={sanitize_key(k): str(v) for k, v in (params or {}).items()},
        model_type=MODEL_TYPE,
    )
    try:
        with_lock_retry(client.log_model_artifacts, model.model_id, str(Path(folder).resolve()))
        timestamp_ms = int(time.time() * 1000)
        linked = [
            Metric(
                sanitize_key(FINAL_PREFIX + key),
                float(value),
                timestamp_ms,
                0,  # as log_final_metrics: the final values are no point of a curve
                model_id=model.model_id,
                dataset_name=evaluated_on.name if evaluated_on else None,
                dataset_digest=evaluated_on.digest if evaluated_on else None,
                run_id=run.run_id,
            )
            for key, value in final_metrics.items()
        ]
        with_lock_retry(client.log_batch, run.run_id, metrics=linked)
        output = LoggedModelOutput(model.model_id, trained_steps)
        with_lock_retry(client.log_outputs, run.run_id, [output])
    except BaseException:
        with_lock_retry(client.finalize_logged_model, model.model_id, "FAILED")
        raise
    with_lock_retry(client.finalize_logged_model, model.model_id, "READY")
    return model.model_id
