"""The supervised learning curve of the cpu preset: mAP after a fixed number of steps per
labeled percent, which shows whether the synthetic set leaves semi-supervised learning room
(a low labeled percent far below all labels)."""

from __future__ import annotations

import time
from pathlib import Path

from softteacher.bench.prepare import BenchTable
from softteacher.data.protocol import synthetic_folds
from softteacher.names import STUDENT_AP, TEACHER_AP
from softteacher.presets import preset
from softteacher.run.local import run_single_process


def curve(data_dir: Path, percents: tuple[float, ...], steps: int) -> BenchTable:
    """Supervised mAP of the cpu preset after ``steps`` steps, per labeled percent."""
    rows, records = [], []
    for percent in percents:
        cfg = preset("cpu").replace(
            method={"method": "supervised"},
            train={
                "max_steps": steps,
                "eval_every": steps,
                "ckpt_every": steps,
                "log_every": 100,
                "max_val_images": None,
            },
        )
        fold = synthetic_folds(data_dir, cfg.synthetic, [percent], [1])[0]
        start = time.perf_counter()
        metrics = run_single_process(
            cfg,
            fold,
            shard_dir=data_dir / "shards",
            checkpoint_dir=data_dir / "bench" / f"curve-{percent:g}-{steps}",
        )
        minutes = (time.perf_counter() - start) / 60
        records.append({"percent": percent, "steps": steps, **metrics, "minutes": minutes})
        rows.append(
            [
                f"{percent:g}%",
                str(steps),
                f"{metrics[TEACHER_AP]:.1f}",
                f"{metrics[STUDENT_AP]:.1f}",
                f"{minutes:.1f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return ["labeled", "steps", "teacher mAP", "student mAP", "minutes"], rows, records
