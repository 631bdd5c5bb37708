"""What the step benchmarks are timed on, made before any clock starts: a detector's config
at a fixed size, the synthetic fold and its shards, a trained teacher kept between runs, and
a trainer with its batches ready (so that a timing holds the step alone, not augmentation)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from softteacher.config import ExperimentConfig
from softteacher.data.protocol import FoldData, synthetic_folds
from softteacher.data.shards import ShardSet, write_shards
from softteacher.presets import preset
from softteacher.run.local import local_step_batches, run_single_process
from softteacher.train.checkpoint import has_checkpoint, load_weights
from softteacher.train.trainer import SoftTeacherTrainer

# What every benchmark returns: the table's header and rows, and the records for its JSON.
BenchTable = tuple[list[str], list[list[str]], list[dict]]
# The preset each detector comes from: the slim one from the caller's preset (cpu, or smoke
# for a quick look), R50-FPN from the paper's.
R50_PRESET = "paper"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synthetic_fold(cfg: ExperimentConfig, data: Path) -> FoldData:
    """The config's synthetic set, 10% labeled, fold 1: the one fold every benchmark uses."""
    return synthetic_folds(data, cfg.synthetic, [10], [1])[0]


def fold_shards(fold: FoldData, data: Path) -> tuple[ShardSet, ShardSet]:
    """The fold's labeled and unlabeled Parquet shards, under ``data/shards``."""
    labeled, unlabeled, _ = fold.load()
    return write_shards(labeled, data / "shards"), write_shards(unlabeled, data / "shards")


def step_config(
    detector: str,
    size: int,
    method: str,
    slim_preset: str,
    amp: str = "off",
    kernels: str = "auto",
) -> ExperimentConfig:
    """A detector's preset at a fixed image size, past burn-in, at full unlabeled weight,
    on the slim preset's synthetic set, with ``method.kernels`` set to ``kernels``."""
    source = preset(R50_PRESET if detector == "r50-fpn" else slim_preset)
    cfg = dataclasses.replace(source, synthetic=preset(slim_preset).synthetic)
    return cfg.replace(
        detector={"amp": amp},
        method={
            "method": method,
            "burn_in_steps": 0,
            "unsup_weight_ramp_steps": 0,
            "kernels": kernels,
        },
        augment={"train_sizes": (size, size), "test_size": size, "max_size": 2 * size},
    )


def trained_teacher(steps: int, slim_preset: str, data: Path) -> Path:
    """A slim supervised run's checkpoint (10% fold 1), trained once and kept; its folder
    names the detector's config, so a preset whose detector changed trains a new one.
    Never evaluated: what the step benchmarks need of it is its candidates, which they
    count, and so they run without pycocotools (the GPU check's machine)."""
    cfg = preset(slim_preset)
    detector = json.dumps(dataclasses.asdict(cfg.detector), sort_keys=True).encode()
    key = hashlib.sha256(detector).hexdigest()[:8]
    directory = data / "bench" / f"teacher-{slim_preset}-{steps}-{key}"
    if has_checkpoint(directory):
        return directory
    cfg = cfg.replace(
        method={"method": "supervised"},
        train={"max_steps": steps, "ckpt_every": steps, "log_every": 50},
    )
    print(f"training a teacher for the Soft Teacher step: {steps} supervised steps", flush=True)
    run_single_process(
        cfg,
        synthetic_fold(cfg, data),
        shard_dir=data / "shards",
        checkpoint_dir=directory,
        evaluate=False,
    )
    return directory


class PreparedSteps:
    """A trainer and a few step batches made before the clock starts, replayed in a cycle:
    what is timed is the step alone, not augmentation."""

    def __init__(
        self, cfg: ExperimentConfig, init: Path | None, data: Path, batches: int = 8
    ) -> None:
        device = default_device()
        labeled, unlabeled = fold_shards(synthetic_fold(cfg, data), data)
        n_labeled, n_unlabeled = cfg.step_batch_sizes(cfg.method.burn_in_steps)
        source = local_step_batches(cfg, labeled, unlabeled if n_unlabeled else None, device)
        self.batches = [
            (source.labeled(n_labeled), source.unlabeled(n_unlabeled) if n_unlabeled else None)
            for _ in range(batches)
        ]
        self.images = n_labeled + n_unlabeled
        self.trainer = SoftTeacherTrainer(cfg, device)
        if init is not None and cfg.detector.preset == "slim":  # the teacher is a slim one
            load_weights(self.trainer, init)
        elif init is not None:
            print(f"{cfg.detector.preset}: from random init (the trained teacher is slim)")
        self.candidates: list[float] = []
        self._next = 0

    def step(self) -> None:
        labeled, unlabeled = self.batches[self._next % len(self.batches)]
        self._next += 1
        metrics = self.trainer.step(labeled, unlabeled)
        self.candidates.append(metrics.get("pseudo/candidates_per_image", 0.0))
