"""The sweep's one-line trial events name every field that tells two trials apart, and the
progress line counts the whole sweep."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from softteacher.tune.grid import TrialSpec
from softteacher.tune.progress import SweepClock, TrialEventPrinter


def trial_name(trial: SimpleNamespace) -> str:
    return trial.printer.name(trial)


def _trial(**overrides) -> SimpleNamespace:
    """A Tune trial as the printer sees it: its config names the job the sweep knows."""
    point = TrialSpec(10.0, 1, "soft_teacher", 0.7, 0.02, **overrides)
    printer = TrialEventPrinter(total=1)
    printer.titles[point.name] = point.title
    return SimpleNamespace(trial_id="t0", config={"job": point.name}, printer=printer)


def test_name_of_a_plain_trial() -> None:
    assert trial_name(_trial()) == "10% fold 1 soft_teacher cls_thr 0.7 reg_thr 0.02"


def test_indicator_jitter_and_seed_rows_print_apart() -> None:
    names = {
        trial_name(_trial(indicator="iou")),
        trial_name(_trial(indicator="bg_student")),
        trial_name(_trial(n_jitter=5)),
        trial_name(_trial(seed=2)),
        trial_name(_trial()),
    }
    assert len(names) == 5
    assert "indicator iou" in trial_name(_trial(indicator="iou"))
    assert "n_jitter 5" in trial_name(_trial(n_jitter=5))
    assert "seed 2" in trial_name(_trial(seed=2))


def test_a_trial_without_a_job_is_named_by_its_id() -> None:
    assert TrialEventPrinter(total=1).name(SimpleNamespace(trial_id="t7", config={})) == "t7"


def test_progress_counts_ended_trials_of_the_whole_sweep(capsys) -> None:
    printer = TrialEventPrinter(total=3)
    trial = SimpleNamespace(**vars(_trial()), last_result={"teacher/AP": 12.5, "student/AP": 11.0})
    printer.titles.update(trial.printer.titles)
    printer.on_trial_start(0, [], trial)
    printer.on_trial_complete(0, [], trial)
    out = capsys.readouterr().out
    assert "[done]  10% fold 1 soft_teacher cls_thr 0.7 reg_thr 0.02" in out
    assert "teacher mAP 12.50" in out
    assert "[sweep] 1/3 trials ended" in out and "ETA" in out


def test_a_trial_finished_earlier_in_mlflow_says_it_was_not_trained_again(capsys) -> None:
    """The same sweep (its name) rerun against a store that holds it finished, e.g. with
    only --results-dir changed: its trials are reported, not trained, and the line says so."""
    printer = TrialEventPrinter(total=1)
    result = {"teacher/AP": 12.5, "final": 1.0, "already_finished": 1.0}
    trial = SimpleNamespace(**vars(_trial()), last_result=result)
    printer.titles.update(trial.printer.titles)
    printer.on_trial_complete(0, [], trial)
    out = capsys.readouterr().out
    assert "teacher mAP 12.50" in out and "not trained again; --name NEW" in out


def test_a_trial_the_scheduler_stopped_is_printed_as_stopped(capsys) -> None:
    printer = TrialEventPrinter(total=2)
    result = {"teacher/AP": 3.0, "trained_steps": 50}
    trial = SimpleNamespace(**vars(_trial()), last_result=result)
    printer.titles.update(trial.printer.titles)
    printer.on_trial_start(0, [], trial)
    printer.on_trial_complete(0, [], trial)
    out = capsys.readouterr().out
    assert "[stopped] 10% fold 1 soft_teacher cls_thr 0.7 reg_thr 0.02 by ASHA after 50" in out
    assert "[done]" not in out and "[sweep] 1/2 trials ended" in out


class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_the_eta_expects_each_kind_of_trial_to_take_what_its_finished_ones_took(
    monkeypatch,
) -> None:
    """Two slots; whole supervised runs take 240 s, branches off their burn-in 90 s."""
    fake = _FakeTime()
    monkeypatch.setattr("softteacher.tune.progress.time", fake)
    clock = SweepClock()
    roots = [TrialSpec(10.0, f, "supervised", 0.7, 0.02) for f in (1, 2, 3)]
    branches = [
        TrialSpec(10.0, f, "soft_teacher", 0.7, 0.02, branch_from=f"/ckpt/{f}") for f in (1, 2, 3)
    ]
    clock.plan({s.name: s.kind for s in roots + branches})
    assert clock.eta_s() is None  # nothing measured yet
    clock.started("a", roots[0].name)
    clock.started("b", roots[1].name)
    fake.now = 240.0
    clock.ended("a", roots[0].name)
    # left: root b (running 240 s of 240) + root 3 (240) + 3 branches (no branch measured:
    # 240 each as the overall mean) over 2 slots
    assert clock.eta_s() == pytest.approx((0 + 240 + 3 * 240) / 2)
    clock.started("c", branches[0].name)
    fake.now = 330.0
    clock.ended("c", branches[0].name)
    # left: root b (0 s more: past its expected time), root 3: 240, 2 branches: 90 each
    assert clock.eta_s() == pytest.approx((0 + 240 + 2 * 90) / 2)


def test_the_eta_ignores_trials_that_did_not_train_to_their_end(monkeypatch) -> None:
    fake = _FakeTime()
    monkeypatch.setattr("softteacher.tune.progress.time", fake)
    clock = SweepClock()
    specs = [TrialSpec(10.0, f, "supervised", 0.7, 0.02) for f in (1, 2)]
    clock.plan({s.name: s.kind for s in specs})
    clock.started("a", specs[0].name)
    fake.now = 5.0
    clock.ended("a", specs[0].name, timed=False)  # failed, or reported from MLflow
    assert clock.eta_s() is None
    clock.started("b", specs[1].name)
    fake.now = 105.0
    clock.ended("b", specs[1].name)
    assert clock.eta_s() == 0.0


def test_the_sweep_line_says_where_each_running_trial_is(capsys) -> None:
    printer = TrialEventPrinter(total=3)
    specs = [TrialSpec(10.0, f, "supervised", 0.7, 0.02) for f in (1, 2, 3)]
    printer.plan({s.name: s.title for s in specs}, {s.name: s.kind for s in specs})
    trials = [
        SimpleNamespace(trial_id=f"t{i}", config={"job": s.name}, last_result={"final": 1.0})
        for i, s in enumerate(specs)
    ]
    for trial in trials:
        printer.on_trial_start(0, [], trial)
    printer.on_trial_result(0, [], trials[2], {"step": 500, "eval_step": 500, "teacher/AP": 11.2})
    printer.on_trial_complete(0, [], trials[0])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("[sweep] 1/3 trials ended")
    assert line.endswith(
        "; running: 10% fold 2 supervised cls_thr 0.7 reg_thr 0.02; "
        "10% fold 3 supervised cls_thr 0.7 reg_thr 0.02 (step 500: teacher mAP 11.20)"
    )


def test_a_printer_restored_with_its_sweep_counts_the_trials_ended_before(
    monkeypatch, capsys
) -> None:
    """A rerun of an interrupted sweep gets Tune's pickled copy of the printer back: its
    clock starts in the resuming process, and the trials finished before count as ended."""
    fake = _FakeTime()
    monkeypatch.setattr("softteacher.tune.progress.time", fake)
    specs = [TrialSpec(10.0, f, "supervised", 0.7, 0.02) for f in (1, 2, 3)]
    printer = TrialEventPrinter(total=3)
    printer.plan({s.name: s.title for s in specs}, {s.name: s.kind for s in specs})
    fake.now = 3600.0  # the rerun, an hour later
    restored = pickle.loads(pickle.dumps(printer))
    trials = [
        SimpleNamespace(trial_id=f"t{i}", config={"job": s.name}, status=status, last_result={})
        for i, (s, status) in enumerate(zip(specs, ("TERMINATED", "TERMINATED", "PENDING")))
    ]
    restored.on_step_begin(0, trials)
    restored.on_step_begin(1, trials)  # counted once
    assert capsys.readouterr().out == (
        "[sweep] resumed: 2/3 trials ended before, not trained again\n"
    )
    restored.on_trial_start(1, trials, trials[2])
    fake.now = 3660.0
    trials[2].last_result = {"teacher/AP": 9.0, "final": 1.0}
    restored.on_trial_complete(1, trials, trials[2])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == "[sweep] 3/3 trials ended, 1.0 min elapsed"
