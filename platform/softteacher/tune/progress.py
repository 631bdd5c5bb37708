"""One line a trial event on the sweep's terminal, instead of Tune's periodic tables."""

from __future__ import annotations

import time

from ray.tune import Callback


class TrialEventPrinter(Callback):
    """Prints a trial's start, each new evaluation, its end or its error."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._last_eval_step: dict[str, int] = {}  # trial id -> step of its last evaluation

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started[trial.trial_id] = time.monotonic()
        print(f"[start] {_name(trial)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get("eval_step", -1))
        if step < 0 or self._last_eval_step.get(trial.trial_id) == step:
            return
        self._last_eval_step[trial.trial_id] = step
        teacher = result.get("teacher/AP", float("nan"))
        student = result.get("student/AP", float("nan"))
        speed = result.get("images_per_s", float("nan"))
        print(
            f"[eval]  {_name(trial)} step {step}: teacher mAP {teacher:.2f}, "
            f"student mAP {student:.2f}, {speed:.1f} img/s",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        minutes = (time.monotonic() - self._started.get(trial.trial_id, time.monotonic())) / 60
        result = trial.last_result or {}
        print(
            f"[done]  {_name(trial)} in {minutes:.1f} min: teacher mAP "
            f"{result.get('teacher/AP', float('nan')):.2f}, student mAP "
            f"{result.get('student/AP', float('nan')):.2f}",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"[error] {_name(trial)}: see {trial.local_path or trial.path}", flush=True)


def _name(trial) -> str:
    spec = trial.config.get("trial", {})
    if not spec:
        return trial.trial_id
    name = (
        f"{spec['ratio']:g}% fold {spec['fold']} {spec['method']} "
        f"fg {spec['fg_thr']:g} var {spec['var_thr']:g}"
    )
    # the rows of the indicator and n_jitter ablations differ only here
    if spec.get("indicator") is not None:
        name += f" indicator {spec['indicator']}"
    if spec.get("n_jitter") is not None:
        name += f" n_jitter {spec['n_jitter']}"
    return name
