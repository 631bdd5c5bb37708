"""The loop's time accounting, on a clock the test moves: what the steps waited for their
images and what each evaluation took are logged beside images/s, each counted once."""

from __future__ import annotations

from types import SimpleNamespace

from softteacher.config import ExperimentConfig
from softteacher.names import DATA_SECONDS, EVAL_SECONDS, IMAGES_PER_S
from softteacher.presets import preset
from softteacher.train import loop
from softteacher.train.loop import LoopHooks, Metrics, fit

DATA_S, STEP_S, EVAL_S = 2.0, 5.0, 7.0  # what each part takes on the test's clock


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Trainer:
    """The part of ``SoftTeacherTrainer`` the loop drives: a step that takes ``STEP_S``."""

    def __init__(self, cfg: ExperimentConfig, clock: _Clock) -> None:
        self.cfg, self.clock, self.step_count = cfg, clock, 0

    def step(self, labeled: SimpleNamespace, unlabeled: SimpleNamespace | None) -> Metrics:
        self.clock.now += STEP_S
        self.step_count += 1
        return {"loss/total": 1.0}


class _Source:
    """Images that take ``DATA_S`` a step to arrive, however many streams the step reads."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def labeled(self, images: int) -> SimpleNamespace:
        self.clock.now += DATA_S
        return SimpleNamespace(images=[None] * images)

    def unlabeled(self, images: int) -> SimpleNamespace:
        return SimpleNamespace(weak=[None] * images)


def test_the_data_wait_and_each_evaluation_are_logged_with_their_seconds(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)
    cfg = preset("smoke").replace(
        method={"burn_in_steps": 3},
        train={"max_steps": 6, "log_every": 3, "eval_every": 3, "ckpt_every": 100},
    )
    logged: list[tuple[int, Metrics]] = []

    def evaluate(trainer: _Trainer) -> Metrics:
        clock.now += EVAL_S
        return {"teacher/AP": 1.0}

    hooks = LoopHooks(
        log=lambda step, metrics: logged.append((step, metrics)),
        evaluate=evaluate,
        checkpoint=lambda trainer, metrics: None,
    )
    fit(_Trainer(cfg, clock), _Source(clock), hooks)

    windows = {step: m for step, m in logged if IMAGES_PER_S in m}
    evaluations = {step: m for step, m in logged if "teacher/AP" in m}
    assert sorted(windows) == sorted(evaluations) == [3, 6]
    burn_in, semi = cfg.train.supervised_images, cfg.train.images_per_step
    for step, images in ((3, burn_in), (6, semi)):
        assert windows[step][DATA_SECONDS] == DATA_S
        # the window's time is its steps and their waits; the evaluation before it is not
        assert windows[step][IMAGES_PER_S] == 3 * images / (3 * (DATA_S + STEP_S))
        assert evaluations[step][EVAL_SECONDS] == EVAL_S
        assert DATA_SECONDS not in evaluations[step]


def test_a_run_without_evaluate_is_never_scored_and_still_checkpoints_at_its_end(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)
    cfg = preset("smoke").replace(
        train={"max_steps": 4, "log_every": 2, "eval_every": 2, "ckpt_every": 100}
    )
    logged: list[tuple[int, Metrics]] = []
    checkpoints: list[int] = []
    hooks = LoopHooks(
        log=lambda step, metrics: logged.append((step, metrics)),
        evaluate=None,
        checkpoint=lambda trainer, metrics: checkpoints.append(trainer.step_count),
    )
    assert fit(_Trainer(cfg, clock), _Source(clock), hooks) == {}
    assert [step for step, _ in logged] == [2, 4]  # the logging windows only
    assert all(EVAL_SECONDS not in metrics for _, metrics in logged)
    assert checkpoints[-1] == 4
