"""A trial's data as MLflow dataset inputs: the runs table's Dataset column then names
each run's fold and ratio, and two runs on the same split show the same digest."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy.exc
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from softteacher.track.mlflow_runs import RunRef, mlflow_client, with_lock_retry

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSplit:
    """One image list a run reads: ``10% fold 1 labeled``, its content digest, the COCO
    file it comes from, its size, and MLflow's context (training, unlabeled, evaluation)."""

    name: str
    digest: str
    annotation_file: Path
    num_images: int
    context: str


def log_data_inputs(run: RunRef, splits: Sequence[DataSplit]) -> None:
    """Log ``splits`` as the run's dataset inputs (MLflow keeps one per name and digest, so
    a resumed trial logging them again adds nothing)."""
    inputs = [
        DatasetInput(
            Dataset(
                name=split.name,
                digest=split.digest,
                source_type="local",
                source=json.dumps({"uri": str(split.annotation_file)}),
                profile=json.dumps({"num_images": split.num_images}),
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, split.context)],
        )
        for split in splits
    ]
    log_dataset_inputs(run, inputs)


def log_dataset_inputs(run: RunRef, inputs: Sequence[DatasetInput]) -> None:
    """Link ``inputs`` to ``run``, the experiment's dataset rows shared between its runs.

    Two trials that start side by side (a shared burn-in's pair) log the same datasets at
    once: both find them missing and both insert them, and the loser's transaction fails on
    the store's unique key with nothing written. Its second try finds the winner's rows.
    """
    client = mlflow_client(run.tracking_uri)
    try:
        with_lock_retry(client.log_inputs, run.run_id, datasets=list(inputs))
    except MlflowException as error:
        if not isinstance(error.__cause__, sqlalchemy.exc.IntegrityError):
            raise
        _logger.info("another run logged the same datasets at once; linking theirs")
        with_lock_retry(client.log_inputs, run.run_id, datasets=list(inputs))
