"""What one run is: the only object that crosses from the sweep to a trial to a worker.

Ray pickles frozen dataclasses as they are, so a ``RunSpec`` travels whole: there is no
hand-written codec to keep in step with its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.train import ScalingConfig

from softteacher.config import ExperimentConfig
from softteacher.data.protocol import FoldData
from softteacher.data.shards import ShardSet
from softteacher.track.mlflow_runs import RunRef


@dataclass(frozen=True)
class WorkerResources:
    """How a run is spread: ``num_workers`` ``TorchTrainer`` workers, or with 0 one worker
    in the calling process (``run/session.py``: the same loop, checkpoints and resume,
    without a worker group to start)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    placement_strategy: str = "PACK"

    @property
    def in_process(self) -> bool:
        return self.num_workers == 0

    @property
    def worker_count(self) -> int:
        """Workers that train: an in-process run is one."""
        return max(1, self.num_workers)

    @property
    def threads_per_worker(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def scaling_config(self) -> ScalingConfig:
        use_gpu = self.gpus_per_worker > 0
        resources = {"CPU": self.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=self.placement_strategy,
        )


@dataclass(frozen=True)
class RunSpec:
    """One run: its config, its fold's files and shards, where it runs and where it logs.

    ``name`` must be unique to the run: Ray Train resumes a run of the same name from
    ``storage_path``, which is what a restarted trial wants and a new trial must never get.
    ``unlabeled`` is None for runs whose steps read no unlabeled images.
    """

    config: ExperimentConfig
    fold: FoldData
    labeled: ShardSet
    unlabeled: ShardSet | None
    name: str
    storage_path: str
    resources: WorkerResources = field(default_factory=WorkerResources)
    tracking: RunRef | None = None
