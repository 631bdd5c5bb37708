"""The sweep's one-line trial events name every field that tells two trials apart, and the
progress line counts the whole sweep."""

from __future__ import annotations

from types import SimpleNamespace

from softteacher.tune.grid import TrialSpec
from softteacher.tune.progress import TrialEventPrinter


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
