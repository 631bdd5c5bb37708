"""The sweep's one-line trial events name every field that tells two trials apart."""

from __future__ import annotations

from types import SimpleNamespace

from softteacher.tune.progress import _name


def _trial(**overrides) -> SimpleNamespace:
    spec = {"ratio": 10.0, "fold": 1, "method": "soft_teacher", "fg_thr": 0.7, "var_thr": 0.02}
    spec.update(overrides)
    return SimpleNamespace(trial_id="t0", config={"trial": spec})


def test_name_of_a_plain_trial() -> None:
    assert _name(_trial()) == "10% fold 1 soft_teacher fg 0.7 var 0.02"


def test_indicator_and_jitter_rows_print_apart() -> None:
    names = {
        _name(_trial(indicator="iou")),
        _name(_trial(indicator="bg_student")),
        _name(_trial(n_jitter=5)),
        _name(_trial()),
    }
    assert len(names) == 4
    assert "indicator iou" in _name(_trial(indicator="iou"))
    assert "n_jitter 5" in _name(_trial(n_jitter=5))


def test_a_trial_without_a_spec_is_named_by_its_id() -> None:
    assert _name(SimpleNamespace(trial_id="t7", config={})) == "t7"
