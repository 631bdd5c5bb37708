"""One line a trial event on the sweep's terminal, instead of Tune's periodic tables, and
after each finished trial where the whole sweep stands: trials done, elapsed time, ETA."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial

from softteacher.names import (
    ALREADY_FINISHED,
    EVAL_STEP,
    IMAGES_PER_S,
    STUDENT_AP,
    TEACHER_AP,
    TRAINED_STEPS,
)


class SweepClock:
    """The sweep's ETA from its measured trial times.

    Trials of one kind (``TrialSpec.kind``: a branch off a burn-in trains a fraction of a
    whole run) are expected to take what the finished ones of that kind took, a kind with
    none finished what all finished trials took; the work left is shared by as many slots
    as have run trials at once. Until a trial has finished there is no estimate.
    """

    def __init__(self) -> None:
        self.began = time.monotonic()
        self._kinds: dict[str, str] = {}  # job name -> kind
        self._planned: Counter[str] = Counter()
        self._ended: Counter[str] = Counter()
        self._running: dict[str, tuple[str, float]] = {}  # trial id -> (kind, start)
        self._took: dict[str, list[float]] = defaultdict(list)
        self._most_at_once = 1

    def plan(self, kinds: Mapping[str, str]) -> None:
        """Jobs (name -> kind) the sweep will run."""
        for job, kind in kinds.items():
            if job not in self._kinds:
                self._planned[kind] += 1
            self._kinds[job] = kind

    @property
    def kinds(self) -> dict[str, str]:
        """The planned jobs: name -> kind."""
        return dict(self._kinds)

    def started(self, trial_id: str, job: str | None) -> None:
        self._running[trial_id] = (self._kinds.get(job, ""), time.monotonic())
        self._most_at_once = max(self._most_at_once, len(self._running))

    def age_s(self, trial_id: str) -> float:
        """Seconds since the trial started (0 for one this sweep did not see start)."""
        _, start = self._running.get(trial_id, ("", None))
        return 0.0 if start is None else time.monotonic() - start

    def ended(self, trial_id: str, job: str | None, *, timed: bool = True) -> None:
        """A trial ended; ``timed``: it trained to its end here (a failed or stopped trial,
        or one reported from MLflow, tells nothing of how long one takes)."""
        kind, start = self._running.pop(trial_id, (self._kinds.get(job, ""), None))
        self._ended[kind] += 1
        if timed and start is not None:
            self._took[kind].append(time.monotonic() - start)

    def eta_s(self) -> float | None:
        every = [s for took in self._took.values() for s in took]
        if not every:
            return None
        overall = statistics.mean(every)

        def expected(kind: str) -> float:
            return statistics.mean(self._took[kind]) if self._took[kind] else overall

        now = time.monotonic()
        running = Counter(kind for kind, _ in self._running.values())
        work = sum(
            max(self._planned[kind] - self._ended[kind] - running[kind], 0) * expected(kind)
            for kind in self._planned
        )
        work += sum(
            max(expected(kind) - (now - start), 0.0) for kind, start in self._running.values()
        )
        return work / self._most_at_once


class TrialEventPrinter(Callback):
    """Prints a trial's start, each new evaluation, its end or its error.

    One printer serves every Tune experiment of a sweep, so ``total`` is the sweep's trial
    count; ``plan`` tells it each job's kind for the ETA (``SweepClock``).

    Tune pickles its callbacks with the experiment, and a restored sweep runs with that copy,
    not with a new one: unpickled, a printer keeps the sweep's size and jobs and starts its
    clock and counts anew, and it counts the trials that had ended before the resume at the
    first step of the restored experiment (Tune starts no such trial again).
    """

    def __init__(self, total: int) -> None:
        self._total = total
        # a trial's config holds its job's name; the terminal shows the job's title
        self.titles: dict[str, str] = {}
        self.clock = SweepClock()
        self._ended = 0
        self._last_eval_step: dict[str, int] = {}  # trial id -> step of its last evaluation
        self._running: dict[str, _Running] = {}  # trial id -> where it is, for the [sweep] line
        self._counted_earlier = False

    def __getstate__(self) -> dict[str, object]:
        return {"total": self._total, "titles": self.titles, "kinds": self.clock.kinds}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["total"])
        self.plan(state["titles"], state["kinds"])

    def plan(self, titles: Mapping[str, str], kinds: Mapping[str, str]) -> None:
        """The jobs of a Tune experiment: name -> terminal title, and name -> kind."""
        self.titles.update(titles)
        self.clock.plan(kinds)

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self._counted_earlier:
            return
        self._counted_earlier = True
        earlier = [t for t in trials if t.status == Trial.TERMINATED]
        for trial in earlier:
            self._ended += 1
            self.clock.ended(trial.trial_id, trial.config.get("job"), timed=False)
        if earlier:
            print(
                f"[sweep] resumed: {self._ended}/{self._total} trials ended before, "
                "not trained again",
                flush=True,
            )

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.clock.started(trial.trial_id, trial.config.get("job"))
        self._running[trial.trial_id] = _Running(self.name(trial))
        print(f"[start] {self.name(trial)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get(EVAL_STEP, -1))
        if step < 0 or self._last_eval_step.get(trial.trial_id) == step:
            return
        self._last_eval_step[trial.trial_id] = step
        teacher = result.get(TEACHER_AP, float("nan"))
        if trial.trial_id in self._running:
            self._running[trial.trial_id].evaluated = (step, teacher)
        student = result.get(STUDENT_AP, float("nan"))
        speed = result.get(IMAGES_PER_S, float("nan"))
        print(
            f"[eval]  {self.name(trial)} step {step}: teacher mAP {teacher:.2f}, "
            f"student mAP {student:.2f}, {speed:.1f} img/s",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        minutes = self.clock.age_s(trial.trial_id) / 60
        result = trial.last_result or {}
        if "final" not in result and TRAINED_STEPS in result:  # ended by the scheduler
            print(
                f"[stopped] {self.name(trial)} by ASHA after {int(result[TRAINED_STEPS])} "
                f"trained steps ({minutes:.1f} min): teacher mAP "
                f"{result.get(TEACHER_AP, float('nan')):.2f}",
                flush=True,
            )
            self._progress(trial, timed=False)
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
        self._progress(trial, timed=not result.get(ALREADY_FINISHED))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"[error] {self.name(trial)}: {_error_line(trial)}", flush=True)
        self._progress(trial, timed=False)

    def name(self, trial) -> str:
        """``10% fold 1 soft_teacher cls_thr 0.7 reg_thr 0.02``, or Tune's id for a trial of
        no job."""
        return self.titles.get(trial.config.get("job"), trial.trial_id)

    def _progress(self, trial, *, timed: bool) -> None:
        self._running.pop(trial.trial_id, None)
        self._ended += 1
        self.clock.ended(trial.trial_id, trial.config.get("job"), timed=timed)
        elapsed = time.monotonic() - self.clock.began
        eta = self.clock.eta_s()
        if self._ended >= self._total:
            left = ""
        elif eta is None:
            left = ", ETA once a trial has trained to its end"
        else:
            left = f", ETA {eta / 60:.1f} min"
        print(
            f"[sweep] {self._ended}/{self._total} trials ended, {elapsed / 60:.1f} min "
            f"elapsed{left}{_running_line(list(self._running.values()))}",
            flush=True,
        )


@dataclass
class _Running:
    """A running trial as the [sweep] line shows it: with its latest evaluation, if any
    (Tune hears of a trial's evaluations, not of its other steps)."""

    title: str
    evaluated: tuple[int, float] | None = None  # step, teacher mAP

    def __str__(self) -> str:
        if self.evaluated is None:
            return self.title
        step, teacher_ap = self.evaluated
        return f"{self.title} (step {step}: teacher mAP {teacher_ap:.2f})"


def _running_line(running: list[_Running], shown: int = 4) -> str:
    """``; running: A; B (step 500: teacher mAP 11.20)`` (the first ``shown`` of them)."""
    if not running:
        return ""
    more = f"; and {len(running) - shown} more" if len(running) > shown else ""
    return "; running: " + "; ".join(str(r) for r in running[:shown]) + more


def _error_line(trial) -> str:
    """The error's own last line (the one-line message), else where Tune keeps it."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1].strip() if lines else f"see {trial.local_path or trial.path}"
