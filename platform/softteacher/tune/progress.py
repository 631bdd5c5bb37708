"""One line a trial event on the sweep's terminal, instead of Tune's periodic tables, and
after each finished trial where the whole sweep stands: trials done, elapsed time, ETA."""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from softteacher.names import (
    ALREADY_FINISHED,
    EVAL_STEP,
    IMAGES_PER_S,
    STUDENT_AP,
    TEACHER_AP,
    TRAINED_STEPS,
)


class TrialEventPrinter(Callback):
    """Prints a trial's start, each new evaluation, its end or its error.

    One printer serves every Tune experiment of a sweep (a shared burn-in runs two), so
    ``total`` is the sweep's trial count and the ETA extrapolates the sweep's own pace:
    elapsed time per finished trial, concurrency included.
    """

    def __init__(self, total: int) -> None:
        self._total = total
        # a trial's config holds its job's name; the terminal shows the job's title
        self.titles: dict[str, str] = {}
        self._begun = time.monotonic()
        self._ended = 0
        self._started: dict[str, float] = {}
        self._last_eval_step: dict[str, int] = {}  # trial id -> step of its last evaluation

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started[trial.trial_id] = time.monotonic()
        print(f"[start] {self.name(trial)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get(EVAL_STEP, -1))
        if step < 0 or self._last_eval_step.get(trial.trial_id) == step:
            return
        self._last_eval_step[trial.trial_id] = step
        teacher = result.get(TEACHER_AP, float("nan"))
        student = result.get(STUDENT_AP, float("nan"))
        speed = result.get(IMAGES_PER_S, float("nan"))
        print(
            f"[eval]  {self.name(trial)} step {step}: teacher mAP {teacher:.2f}, "
            f"student mAP {student:.2f}, {speed:.1f} img/s",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        minutes = (time.monotonic() - self._started.get(trial.trial_id, time.monotonic())) / 60
        result = trial.last_result or {}
        if "final" not in result and TRAINED_STEPS in result:  # ended by the scheduler
            print(
                f"[stopped] {self.name(trial)} by ASHA after {int(result[TRAINED_STEPS])} "
                f"trained steps ({minutes:.1f} min): teacher mAP "
                f"{result.get(TEACHER_AP, float('nan')):.2f}",
                flush=True,
            )
            self._progress()
            return
        earlier = (
            " (finished earlier in this MLflow store: not trained again; --name NEW trains "
            "a new sweep)"
            if result.get(ALREADY_FINISHED)
            else ""
        )
        print(
            f"[done]  {self.name(trial)} in {minutes:.1f} min: teacher mAP "
            f"{result.get(TEACHER_AP, float('nan')):.2f}, student mAP "
            f"{result.get(STUDENT_AP, float('nan')):.2f}{earlier}",
            flush=True,
        )
        self._progress()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"[error] {self.name(trial)}: {_error_line(trial)}", flush=True)
        self._progress()

    def name(self, trial) -> str:
        """``10% fold 1 soft_teacher cls_thr 0.7 reg_thr 0.02``, or Tune's id for a trial of
        no job."""
        return self.titles.get(trial.config.get("job"), trial.trial_id)

    def _progress(self) -> None:
        self._ended += 1
        elapsed = time.monotonic() - self._begun
        left = max(self._total - self._ended, 0)
        eta = elapsed / self._ended * left
        print(
            f"[sweep] {self._ended}/{self._total} trials ended, {elapsed / 60:.1f} min "
            f"elapsed, ETA {eta / 60:.1f} min",
            flush=True,
        )


def _error_line(trial) -> str:
    """The error's own last line (the one-line message), else where Tune keeps it."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1].strip() if lines else f"see {trial.local_path or trial.path}"
