"""Benchmarks of the core (no Ray): step speed of the slim preset and its learning curve.

    python experiments/benchmark_core.py speed            # supervised vs soft-teacher steps/s
    python experiments/benchmark_core.py curve --steps 600 --percents 1,10,100

Prints figures and writes a Markdown table under experiments/results/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from softteacher.config import ExperimentConfig
from softteacher.data.protocol import synthetic_folds
from softteacher.data.shards import write_shards
from softteacher.presets import preset
from softteacher.run.local import local_step_batches, run_single_process
from softteacher.train.checkpoint import load_weights
from softteacher.train.trainer import SoftTeacherTrainer

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1] / "data"


def _cfg_at(short_side: int, method: str) -> ExperimentConfig:
    cfg = preset("cpu")
    return cfg.replace(
        method={"method": method, "burn_in_steps": 0, "unsup_weight_ramp_steps": 0},
        augment={"train_sizes": (short_side, short_side), "test_size": short_side},
    )


def measure_speed(short_side: int, steps: int, warmup: int, init: Path | None) -> dict[str, float]:
    """Steps/s and images/s of one supervised and one full soft-teacher step (1 + 4 images),
    data preparation excluded (batches are prepared before the clock starts). A teacher from
    random init proposes no pseudo boxes, so ``init`` (a trained run's checkpoint folder)
    gives the soft-teacher step its real cost: jittering every candidate."""
    figures = {}
    for method in ("supervised", "soft_teacher_jitter"):
        cfg = _cfg_at(short_side, method)
        fold = synthetic_folds(DATA, cfg.synthetic, [10], [1])[0]
        labeled, unlabeled, _ = fold.load()
        n_labeled, n_unlabeled = cfg.step_batch_sizes(cfg.method.burn_in_steps)
        device = torch.device("cpu")
        source = local_step_batches(
            cfg,
            write_shards(labeled, DATA / "shards"),
            write_shards(unlabeled, DATA / "shards") if n_unlabeled else None,
            device,
        )
        lab = [source.labeled(n_labeled) for _ in range(warmup + steps)]
        unl = [source.unlabeled(n_unlabeled) if n_unlabeled else None for _ in lab]
        trainer = SoftTeacherTrainer(cfg, device)
        if init is not None:
            load_weights(trainer, init)
        pseudo = []
        for i, (lb, ub) in enumerate(zip(lab, unl)):
            if i == warmup:
                start = time.perf_counter()
            metrics = trainer.step(lb, ub)
            pseudo.append(metrics.get("pseudo/candidates_per_image", 0.0))
        elapsed = time.perf_counter() - start
        figures[f"{method} steps/s"] = steps / elapsed
        figures[f"{method} images/s"] = steps * (n_labeled + n_unlabeled) / elapsed
        figures[f"{method} candidates"] = sum(pseudo[warmup:]) / steps
    return figures


def learning_curve(percents: list[float], steps: int) -> dict[float, dict[str, float]]:
    """Supervised mAP of the slim preset after a fixed number of steps, per labeled percent."""
    curve = {}
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
            optim={"warmup_steps": 100, "decay_steps": (int(steps * 0.8),), "grad_clip_norm": None},
        )
        fold = synthetic_folds(DATA, cfg.synthetic, [percent], [1])[0]
        start = time.perf_counter()
        metrics = run_single_process(
            cfg,
            fold,
            shard_dir=DATA / "shards",
            checkpoint_dir=DATA / "bench" / f"curve-{percent:g}",
        )
        metrics["minutes"] = (time.perf_counter() - start) / 60
        curve[percent] = metrics
        print(
            f"{percent:g}% labeled: teacher mAP {metrics['teacher/AP']:.1f}, "
            f"student mAP {metrics['student/AP']:.1f} ({metrics['minutes']:.1f} min)",
            flush=True,
        )
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--sizes", default="256,160")
    speed.add_argument("--steps", type=int, default=20)
    speed.add_argument("--warmup", type=int, default=3)
    speed.add_argument(
        "--init",
        type=Path,
        default=None,
        help="checkpoint folder of a trained run, e.g. data/bench/curve-100",
    )
    curve = sub.add_parser("curve")
    curve.add_argument("--percents", default="1,10,100")
    curve.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.command == "speed":
        lines = [
            "| image short side | method | steps/s | images/s | teacher candidates/image |",
            "|---|---|---|---|---|",
        ]
        for size in (int(s) for s in args.sizes.split(",")):
            figures = measure_speed(size, args.steps, args.warmup, args.init)
            for method in ("supervised", "soft_teacher_jitter"):
                row = (
                    f"| {size} | {method} | {figures[f'{method} steps/s']:.2f} | "
                    f"{figures[f'{method} images/s']:.2f} | "
                    f"{figures[f'{method} candidates']:.1f} |"
                )
                print(row, flush=True)
                lines.append(row)
        out = RESULTS / "core_speed.md"
        out.write_text(f"Slim preset, {threads} torch threads, CPU.\n\n" + "\n".join(lines) + "\n")
    else:
        results = learning_curve([float(p) for p in args.percents.split(",")], args.steps)
        lines = [
            "| labeled | steps | teacher mAP | student mAP | minutes |",
            "|---|---|---|---|---|",
        ]
        for percent, m in results.items():
            lines.append(
                f"| {percent:g}% | {args.steps} | {m['teacher/AP']:.1f} | "
                f"{m['student/AP']:.1f} | {m['minutes']:.1f} |"
            )
        out = RESULTS / "core_learning_curve.md"
        out.write_text(
            f"Supervised slim preset, default synthetic set, {threads} torch threads.\n\n"
            + "\n".join(lines)
            + "\n"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
