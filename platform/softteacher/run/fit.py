"""``run(spec)``: one fit of a ``RunSpec`` (a ``TorchTrainer``, or its one worker in process),
and what it left behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from softteacher.names import FINAL_METRICS
from softteacher.run.session import InProcessSession, latest_checkpoint
from softteacher.run.spec import RunSpec
from softteacher.run.worker import (
    RunInputError,
    fatal_error_file,
    input_error,
    train_loop_per_worker,
    train_recording_input_errors,
)


@dataclass(frozen=True)
class RunResult:
    """A finished run's final teacher and student metrics and its last checkpoint folder."""

    metrics: dict[str, float]
    checkpoint: ray.train.Checkpoint | None

    @classmethod
    def of(cls, result: ray.train.Result) -> RunResult:
        logged = result.metrics or {}
        metrics = {k: float(v) for k, v in logged.items() if k in FINAL_METRICS}
        return cls(metrics, result.checkpoint)


def build_torch_trainer(spec: RunSpec, callbacks: list | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for one run; its workers stream their own rows (run/worker.py)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=spec.resources.scaling_config(),
        run_config=RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.config.train.keep_checkpoints),
            callbacks=callbacks or [],
        ),
    )


def run(spec: RunSpec, callbacks: list | None = None) -> RunResult:
    """Train, evaluate and checkpoint one run (resuming it when ``spec.name`` ran before).

    A worker that fails on its input (a bad image, a class-count mismatch, a NaN loss)
    leaves its one-line message behind (``fatal_error_file``); the restarted workers fail at
    once on it instead of training to the same error again, and the run raises
    ``RunInputError`` with that message rather than Ray's wrapped traceback.
    """
    marker = fatal_error_file(spec)
    marker.unlink(missing_ok=True)  # a rerun after the user fixed the input starts clean
    try:
        if spec.resources.in_process:
            return run_in_process(spec, callbacks)
        return RunResult.of(build_torch_trainer(spec, callbacks).fit())
    except Exception:
        if marker.is_file():
            raise RunInputError(marker.read_text().strip()) from None
        raise


def run_in_process(spec: RunSpec, callbacks: list | None = None) -> RunResult:
    """The run's one worker in this process; like Ray Train's ``FailureConfig``, a failure
    restarts it from its latest checkpoint up to ``max_failures`` times (not an input
    error, seen in the error's own chain: no restart at all)."""
    run_dir = Path(spec.storage_path) / spec.name
    device = torch.device("cuda" if spec.resources.gpus_per_worker > 0 else "cpu")
    for attempt in range(spec.resources.max_failures + 1):
        session = InProcessSession(
            run_dir, spec.name, spec.config.train.keep_checkpoints, callbacks, device
        )
        try:
            train_recording_input_errors(spec, session)
            break
        except Exception as error:
            if input_error(error) is not None or attempt == spec.resources.max_failures:
                raise
            print(
                f"{spec.name}: {type(error).__name__}: {error}; restarting from the latest "
                f"checkpoint (restart {attempt + 1} of {spec.resources.max_failures})"
            )
    metrics = {k: float(v) for k, v in session.last_metrics.items() if k in FINAL_METRICS}
    latest = latest_checkpoint(run_dir)
    return RunResult(metrics, None if latest is None else Checkpoint.from_directory(str(latest)))
