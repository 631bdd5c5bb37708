"""The ``paper`` preset (what users run on GPUs) trains on a CPU: R50-FPN and the paper's
method and step, through a trial's own entry point, with only the image sizes and the
schedule cut down, and the class count the sweep would take from the dataset; so the preset
cannot break unseen."""

from __future__ import annotations

import dataclasses
import math

import pytest
from mlflow.tracking import MlflowClient

from softteacher.names import LOSS_TOTAL, TEACHER_AP
from softteacher.presets import preset
from softteacher.run.fit import run
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.track.mlflow_runs import start_parent_run

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_the_paper_preset_takes_a_soft_teacher_step_and_evaluates(
    ray_cluster, smoke_fold, tmp_path
):
    base = preset("paper")
    classes = preset("smoke").synthetic.num_classes
    cfg = base.replace(
        detector={"num_classes": classes},
        augment={"train_sizes": (64, 96), "max_size": 160, "test_size": 80},
        train={
            "max_steps": 1,  # an R50-FPN step of 5 images takes ~6-10 s on 2 cores
            "eval_every": 1,
            "ckpt_every": 1,
            "log_every": 1,
            "max_val_images": 4,
            "pseudo_quality_images": 4,
            "data_actors": 1,  # the preset's six a stream feed a GPU; a step of 5 needs one
        },
    )
    assert cfg.detector == dataclasses.replace(base.detector, num_classes=classes)
    assert cfg.method == base.method
    assert cfg.detector.preset == "r50-fpn" and cfg.method.method == "soft_teacher_jitter"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = start_parent_run(uri, "tests", "paper", {})
    spec = RunSpec(
        cfg,
        smoke_fold.fold,
        smoke_fold.labeled,
        smoke_fold.unlabeled,
        name="paper",
        storage_path=str(tmp_path / "train"),
        resources=WorkerResources(num_workers=0, cpus_per_worker=2),
        tracking=tracking,
    )
    with pytest.warns(UserWarning, match="without backbone_weights starts from random init"):
        result = run(spec)

    assert result.checkpoint is not None and TEACHER_AP in result.metrics
    client = MlflowClient(uri)
    losses = client.get_metric_history(tracking.run_id, LOSS_TOTAL)
    assert [m.step for m in losses] == [1] and all(math.isfinite(m.value) for m in losses)
    # the unlabeled half of the method ran from step 0 (the paper has no burn-in)
    assert (
        client.get_metric_history(tracking.run_id, "unsup_weight")[0].value
        == base.method.unsup_weight
    )
    assert client.get_metric_history(tracking.run_id, "loss/unsup_cls")
