"""The loop's cadence and its time accounting: what a step waited for its images and what
each evaluation took are logged beside images/s, from the loop's own clock."""

from __future__ import annotations

import time
from types import SimpleNamespace

from softteacher.names import DATA_SECONDS, EVAL_SECONDS, IMAGES_PER_S
from softteacher.presets import preset
from softteacher.train.loop import LoopHooks, fit

WAIT_S = 0.02  # what the stub source makes every step wait for its images
EVAL_S = 0.05


class _Trainer:
    """The part of ``SoftTeacherTrainer`` the loop drives: a step counter."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.step_count = 0

    def step(self, labeled, unlabeled) -> dict[str, float]:
        self.step_count += 1
        return {"loss/total": 1.0}


class _SlowSource:
    def labeled(self, images: int):
        time.sleep(WAIT_S)
        return SimpleNamespace(images=[None] * images)

    def unlabeled(self, images: int):
        return SimpleNamespace(weak=[None] * images)


def test_the_data_wait_and_each_evaluation_are_logged_with_their_seconds():
    cfg = preset("smoke").replace(
        method={"burn_in_steps": 2},
        train={"max_steps": 6, "log_every": 3, "eval_every": 3, "ckpt_every": 100},
    )
    logged: list[tuple[int, dict]] = []

    def evaluate(trainer) -> dict[str, float]:
        time.sleep(EVAL_S)
        return {"teacher/AP": 1.0}

    hooks = LoopHooks(
        log=lambda step, metrics: logged.append((step, metrics)),
        evaluate=evaluate,
        checkpoint=lambda trainer, metrics: None,
    )
    fit(_Trainer(cfg), _SlowSource(), hooks)

    windows = [(step, m) for step, m in logged if IMAGES_PER_S in m]
    evaluations = [(step, m) for step, m in logged if "teacher/AP" in m]
    assert [step for step, _ in windows] == [3, 6]
    assert [step for step, _ in evaluations] == [3, 6]
    for _, metrics in windows:
        assert WAIT_S <= metrics[DATA_SECONDS] < 1.0
        # the wait is part of the window's time: images/s cannot beat images / wait
        most_images = max(cfg.train.images_per_step, cfg.train.supervised_images)
        assert metrics[IMAGES_PER_S] <= most_images / WAIT_S
    for _, metrics in evaluations:
        assert EVAL_S <= metrics[EVAL_SECONDS] < 5.0
        assert DATA_SECONDS not in metrics
