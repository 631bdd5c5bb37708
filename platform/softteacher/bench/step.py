"""The training step alone: images/s of the supervised and the Soft Teacher step at equal
images a step (``speed``), and one Soft Teacher step broken into its parts (``profile``).
Both start from a trained teacher, so the Soft Teacher step jitters and scores real
candidates instead of the empty ones of a random teacher."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from softteacher.bench.prepare import BenchTable, PreparedSteps, step_config, trained_teacher
from softteacher.train.step_profile import profile_steps

METHODS = ("supervised", "soft_teacher_jitter")


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """What the step benchmarks measure. ``speed`` times every detector x size x amp x
    kernels (the supervised step uses no kernel: timed once); ``profile`` takes the first of
    each."""

    data_dir: Path  # synthetic sets, shards, the kept teacher
    detectors: tuple[str, ...]  # slim and/or r50-fpn
    sizes: tuple[int, ...]  # image short sides
    amp: tuple[str, ...]  # backbone precisions, e.g. off, bf16
    kernels: tuple[str, ...]  # method.kernels: auto (Triton on CUDA), reference
    steps: int  # timed steps a repeat
    repeats: int
    warmup: int  # untimed steps first
    init: Path | None  # a trained run's checkpoint folder; None: train one
    teacher_steps: int  # the teacher trained here; 0: a random teacher (no candidates)
    preset: str  # the slim detector's preset


def _teacher(options: StepOptions) -> Path | None:
    """``init``, else a teacher trained here once (none with ``teacher_steps`` 0)."""
    if options.init is not None or options.teacher_steps == 0:
        return options.init
    return trained_teacher(options.teacher_steps, options.preset, options.data_dir)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed_cases(options: StepOptions) -> list[tuple[str, int, str, str, str]]:
    """(detector, size, amp, kernels, method) for each row of ``speed``, in its order; the
    supervised step uses no kernel, so it is timed with the first ``kernels`` only."""
    grid = itertools.product(
        options.detectors, options.sizes, options.amp, options.kernels, METHODS
    )
    first_kernels = options.kernels[0]
    return [case for case in grid if case[-1] != "supervised" or case[3] == first_kernels]


def speed(options: StepOptions) -> BenchTable:
    """images/s of each method a step at equal images a step, median over repeats."""
    init = _teacher(options)
    header = [
        "detector",
        "short side",
        "amp",
        "kernels",
        "method",
        "images/step",
        "images/s (median)",
        "range",
        "candidates/image",
        "RSS MiB",
        "CUDA max MiB",
    ]
    rows, records = [], []
    for detector, size, amp, kernels, method in speed_cases(options):
        cfg = step_config(detector, size, method, options.preset, amp, kernels)
        prepared = PreparedSteps(cfg, init, options.data_dir)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(options.warmup):
            prepared.step()
        speeds = []
        for _ in range(options.repeats):
            _sync()
            start = time.perf_counter()
            for _ in range(options.steps):
                prepared.step()
            _sync()
            speeds.append(options.steps * prepared.images / (time.perf_counter() - start))
        timed = prepared.candidates[options.warmup :]
        record = {
            "detector": detector,
            "size": size,
            "amp": amp,
            "kernels": kernels,
            "method": method,
            "images_per_step": prepared.images,
            "images_per_s": statistics.median(speeds),
            "images_per_s_all": speeds,
            "candidates_per_image": sum(timed) / len(timed),
            "rss_mib": psutil.Process().memory_info().rss / 2**20,
            "cuda_max_mib": (
                torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
            ),
        }
        records.append(record)
        rows.append(
            [
                detector,
                str(size),
                amp,
                kernels,
                method,
                str(prepared.images),
                f"{record['images_per_s']:.2f}",
                f"{min(speeds):.2f}-{max(speeds):.2f}",
                f"{record['candidates_per_image']:.1f}",
                f"{record['rss_mib']:.0f}",
                "-" if record["cuda_max_mib"] is None else f"{record['cuda_max_mib']:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return header, rows, records


def profile(options: StepOptions) -> BenchTable:
    """One Soft Teacher step's parts and their shares; the operators that dominate."""
    init = _teacher(options)
    cfg = step_config(
        options.detectors[0],
        options.sizes[0],
        METHODS[1],
        options.preset,
        options.amp[0],
        options.kernels[0],
    )
    prepared = PreparedSteps(cfg, init, options.data_dir)
    for _ in range(options.warmup):
        prepared.step()
    result = profile_steps(prepared.step, options.steps)
    candidates = sum(prepared.candidates[options.warmup :]) / options.steps
    print(f"{result.step_ms:.0f} ms a step, {candidates:.1f} teacher candidates an image")
    shares = result.shares()
    rows = [
        [name, f"{share * result.step_ms:.1f}", f"{share:.1%}"] for name, share in shares.items()
    ]
    rows += [
        [f"op: {name}", f"{ms:.1f}", f"{ms / result.step_ms:.1%}"] for name, ms in result.top_ops
    ]
    records = [
        {
            "step_ms": result.step_ms,
            "candidates_per_image": candidates,
            "part_ms": result.part_ms,
            "shares": shares,
            "top_ops": result.top_ops,
        }
    ]
    return ["part (own time)", "ms a step", "share of the step"], rows, records
