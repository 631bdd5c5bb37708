"""Trial progress as Ray metrics, so the dashboard's Metrics view (and any Prometheus that
scrapes Ray) shows each run's step, speed and latest mAP while it trains."""

from __future__ import annotations

from ray.util.metrics import Gauge

from softteacher.names import DATA_SECONDS, EVAL_SECONDS, IMAGES_PER_S

_GAUGES = {
    "step": "training step of the run",
    IMAGES_PER_S: "images a second over the last logging window",
    DATA_SECONDS: "seconds a step spent taking its images, over the last logging window",
    EVAL_SECONDS: "seconds the latest evaluation took",
    "teacher/AP": "teacher COCO mAP at the latest evaluation",
    "student/AP": "student COCO mAP at the latest evaluation",
    "pseudo/cls_per_image": "classification pseudo boxes an unlabeled image",
    "loss/total": "total loss of the latest logged step",
    "nonfinite_steps": "steps skipped for a NaN or infinite loss or gradient",
}


class ProgressGauges:
    """One gauge a figure, tagged with the run's name (``softteacher_images_per_s`` ...)."""

    def __init__(self, run_name: str) -> None:
        self._tags = {"run": run_name}
        self._gauges = {
            key: Gauge("softteacher_" + key.replace("/", "_"), description=text, tag_keys=("run",))
            for key, text in _GAUGES.items()
        }

    def update(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in {"step": float(step), **metrics}.items():
            gauge = self._gauges.get(key)
            if gauge is not None:
                gauge.set(value, tags=self._tags)
