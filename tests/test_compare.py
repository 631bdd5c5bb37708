"""Comparison from MLflow against a real sqlite store shaped like a sweep's: the grouped
mean +- std, the errors a user meets, and the compare.py CLI with its plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from softteacher.track.compare import (
    MissingStoreError,
    NoRunsError,
    UnknownExperimentError,
    UnknownFieldError,
    format_summary,
    group_summary,
    load_runs,
    newest_parent_run,
)
from softteacher.track.mlflow_runs import (
    RunRef,
    find_or_start_child_run,
    finish_run,
    log_file_artifact,
    log_final_metrics,
    log_metrics,
    start_parent_run,
)
from softteacher.track.plots import (
    PSEUDO_BOXES_ARTIFACT,
    MissingPlotDataError,
    plot_pseudo_scatter,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FOLDS = (1, 2, 3)
# teacher AP per fold; the hand-computed mean and sample std are in the tests below
TEACHER_AP = {
    ("supervised", 5.0): (10.0, 12.0, 14.0),
    ("supervised", 10.0): (20.0, 21.0, 25.0),
    ("soft_teacher_jitter", 5.0): (15.0, 15.5, 16.0),
    ("soft_teacher_jitter", 10.0): (30.0, 33.0, 36.0),
}
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
SCATTER_RUN = "r10-f1-soft_teacher_jitter-cls0.9-reg0.02"


@dataclass(frozen=True)
class Store:
    uri: str
    sweep: RunRef  # the newest fold_sweep parent: 12 children
    old_sweep: RunRef  # an older fold_sweep parent: one e2e child
    ablations: RunRef
    children: dict[str, str]  # run name -> id, of ``sweep``


def _trial_params(method: str, ratio: float, fold: int) -> dict[str, object]:
    """As run_trial logs them (``trial.trial_params``): the data's ratio and fold, the short
    keys, and config fields under the config's names."""
    return {
        "ratio": ratio,
        "fold": fold,
        "method": method,
        "seed": 0,
        "preset": "smoke",
        "git_commit": "test",
        "method.cls_thr": 0.9,
        "method.reg_thr": 0.02,
        "method.method": method,
    }


def _add_trial(parent: RunRef, method: str, ratio: float, fold: int, teacher_ap: float) -> RunRef:
    name = f"r{ratio:g}-f{fold}-{method}-cls0.9-reg0.02"
    child = find_or_start_child_run(parent, name, _trial_params(method, ratio, fold))
    unlabeled = method != "supervised"
    for step in range(0, 12, 2):
        metrics = {"loss/total": 3.0 / (step + 1) + fold, "loss/sup_cls": 1.0 / (step + 1)}
        if unlabeled:
            metrics |= {"loss/unsup_cls": 0.5 / (step + 1), "pseudo/cls_per_image": 2.0 + step}
        if step in (4, 10):  # evaluation steps
            metrics |= {"teacher/AP": teacher_ap * step / 10, "student/AP": teacher_ap * step / 20}
            if unlabeled:
                metrics |= _pseudo_quality(step)
        log_metrics(child, metrics, step)
    log_final_metrics(child, {"teacher/AP": teacher_ap, "student/AP": teacher_ap / 2}, step=10)
    return child


def _pseudo_quality(step: int) -> dict[str, float]:
    """Precision rises and recall falls with the threshold, as in Fig. 3a."""
    metrics = {}
    for t in THRESHOLDS:
        metrics[f"pseudo_quality/precision_{t:g}"] = min(1.0, t + step / 100)
        metrics[f"pseudo_quality/recall_{t:g}"] = 1.0 - t + step / 100
    return metrics | {"pseudo_quality/precision_fg": 0.9, "pseudo_quality/recall_fg": 0.2}


def _write_boxes(folder: Path) -> Path:
    """IoU that grows with the score and shrinks with the variance; two boxes lack a variance."""
    boxes = [
        {"iou": 0.3 + 0.6 * i / 99, "score": 0.5 + 0.5 * i / 99, "variance": 0.05 - 0.04 * i / 99}
        for i in range(100)
    ]
    boxes += [{"iou": 0.5, "score": 0.7, "variance": None}] * 2
    path = folder / PSEUDO_BOXES_ARTIFACT
    path.write_text(json.dumps(boxes))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    folder = tmp_path_factory.mktemp("compare_store")
    uri = f"sqlite:///{folder}/mlflow.db"
    old_sweep = start_parent_run(uri, "fold_sweep", "old-sweep", {"preset": "smoke"})
    _add_trial(old_sweep, "e2e", 10.0, 1, 18.0)
    finish_run(old_sweep)
    time.sleep(0.02)  # start times are in ms: the next sweep must be strictly newer
    sweep = start_parent_run(uri, "fold_sweep", "sweep", {"preset": "smoke"})
    children = {}
    for (method, ratio), values in TEACHER_AP.items():
        for fold, teacher_ap in zip(FOLDS, values, strict=True):
            child = _add_trial(sweep, method, ratio, fold, teacher_ap)
            children[f"r{ratio:g}-f{fold}-{method}-cls0.9-reg0.02"] = child.run_id
    failed = _add_trial(sweep, "supervised", 10.0, 9, 99.0)  # a crashed trial: never counted
    finish_run(failed, "FAILED")
    log_file_artifact(RunRef(uri, children[SCATTER_RUN], sweep.experiment_id), _write_boxes(folder))
    ablations = start_parent_run(uri, "ablations", "table6", {"preset": "smoke"})
    _add_trial(ablations, "soft_teacher", 10.0, 1, 28.0)
    for flat_ap in (5.0, 7.0):  # runs without a parent: logged by hand, not by a sweep
        flat = start_parent_run(uri, "flat", f"manual-{flat_ap:g}", {"method": "supervised"})
        log_metrics(flat, {"final/teacher/AP": flat_ap}, step=0)
    return Store(uri, sweep, old_sweep, ablations, children)


def _row(summary, **keys) -> dict:
    selected = summary
    for name, value in keys.items():
        selected = selected[selected[name] == value]
    assert len(selected) == 1, f"expected one row for {keys}, got {len(selected)}"
    return selected.iloc[0].to_dict()


def test_group_summary_is_the_hand_computed_mean_and_sample_std(store: Store):
    runs = load_runs(store.uri, ["fold_sweep"])
    assert len(runs) == 13  # 12 + the old sweep's child; no parent runs
    summary = group_summary(runs, ["method", "ratio"], ["final/teacher/AP", "final/student/AP"])
    assert list(summary["method"]) == [
        "supervised",
        "supervised",
        "e2e",
        "soft_teacher_jitter",
        "soft_teacher_jitter",
    ]  # ablation order, then ratio
    assert list(summary["ratio"]) == [5.0, 10.0, 10.0, 5.0, 10.0]
    expected = {  # (method, ratio): (mean, sample std) of the teacher AP by hand
        ("supervised", 5.0): (12.0, 2.0),
        ("supervised", 10.0): (22.0, math.sqrt((4 + 1 + 9) / 2)),
        ("soft_teacher_jitter", 5.0): (15.5, 0.5),
        ("soft_teacher_jitter", 10.0): (33.0, 3.0),
        ("e2e", 10.0): (18.0, 0.0),  # a single run: std 0, not NaN
    }
    for (method, ratio), (mean, std) in expected.items():
        row = _row(summary, method=method, ratio=ratio)
        n = 1 if method == "e2e" else 3
        assert row["runs"] == n and row["final/teacher/AP n"] == n
        assert row["final/teacher/AP mean"] == pytest.approx(mean, abs=1e-12)
        assert row["final/teacher/AP std"] == pytest.approx(std, abs=1e-12)
        assert row["final/student/AP mean"] == pytest.approx(mean / 2, abs=1e-12)
        assert row["final/student/AP std"] == pytest.approx(std / 2, abs=1e-12)


def test_by_and_metrics_accept_the_search_runs_column_names(store: Store):
    runs = load_runs(store.uri, ["fold_sweep"], parent_run_id=store.sweep.run_id)
    bare = group_summary(runs, ["method", "ratio"], ["final/teacher/AP"])
    prefixed = group_summary(runs, ["params.method", "params.ratio"], ["metrics.final/teacher/AP"])
    assert bare.equals(prefixed)
    assert len(bare) == 4  # the parent filter left the old sweep's e2e child out
    by_config_field = group_summary(runs, ["method.method", "fold"], ["final/teacher/AP"])
    assert set(by_config_field["runs"]) == {2}  # each (method, fold) over the two ratios


def test_format_summary_shows_mean_and_std_cells(store: Store):
    runs = load_runs(store.uri, ["fold_sweep"], parent_run_id=store.sweep.run_id)
    text = format_summary(group_summary(runs, ["method", "ratio"], ["final/teacher/AP"]))
    lines = text.splitlines()
    assert lines[0].split() == ["method", "ratio", "runs", "final/teacher/AP"]
    assert lines[2].split() == ["supervised", "5", "3", "12.00", "+-", "2.00"]
    assert lines[-1].split() == ["soft_teacher_jitter", "10", "3", "33.00", "+-", "3.00"]


def test_runs_without_parents_are_all_loaded(store: Store):
    runs = load_runs(store.uri, ["flat"])
    summary = group_summary(runs, ["method"], ["final/teacher/AP"])
    assert summary["final/teacher/AP mean"].tolist() == [6.0]
    assert summary["final/teacher/AP std"].tolist() == [pytest.approx(math.sqrt(2))]


def test_user_errors_name_what_is_wrong_and_the_choices(store: Store):
    with pytest.raises(UnknownExperimentError, match="'nope' does not exist") as error:
        load_runs(store.uri, ["fold_sweep", "nope"])
    assert "existing experiments: ablations, Default, flat, fold_sweep" in str(error.value)
    with pytest.raises(NoRunsError, match="no runs under parent run 0123abcd"):
        load_runs(store.uri, ["fold_sweep"], parent_run_id="0123abcd")
    runs = load_runs(store.uri, ["fold_sweep"])
    with pytest.raises(UnknownFieldError, match="param 'methd'.*fold, git_commit, method"):
        group_summary(runs, ["methd"], ["final/teacher/AP"])
    with pytest.raises(UnknownFieldError, match="metric 'final/teacher/mAP'.*final/teacher/AP"):
        group_summary(runs, ["method"], ["final/teacher/mAP"])
    with pytest.raises(MissingPlotDataError, match=f"has no {PSEUDO_BOXES_ARTIFACT}"):
        plot_pseudo_scatter(store.uri, store.children["r5-f1-supervised-cls0.9-reg0.02"], Path("."))
    assert newest_parent_run(store.uri, "fold_sweep") == store.sweep.run_id


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path: Path):
    db_file = tmp_path / "mlflow.db"
    with pytest.raises(MissingStoreError, match=f"no MLflow store at {db_file}"):
        load_runs(f"sqlite:///{db_file}", ["fold_sweep"])
    assert not db_file.exists()


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "experiments/compare.py", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_table_and_writes_and_logs_the_plots(store: Store, tmp_path: Path):
    out = tmp_path / "plots"
    done = _compare(
        "--experiment",
        "fold_sweep,ablations",
        "--tracking-uri",
        store.uri,
        "--plot",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines()]
    assert table[0] == ["method", "ratio", "runs", "final/teacher/AP", "final/student/AP"]
    assert ["soft_teacher", "10", "1", "28.00", "+-", "0.00", "14.00", "+-", "0.00"] in table
    assert ["soft_teacher_jitter", "10", "3", "33.00", "+-", "3.00", "16.50", "+-", "1.50"] in table

    expected = {
        "map_vs_ratio_final_teacher_AP.png",
        "map_vs_ratio_final_student_AP.png",
        "training_curves.png",
        "pseudo_precision_recall.png",
        f"{SCATTER_RUN}_iou_vs_score.png",
        f"{SCATTER_RUN}_iou_vs_variance.png",
    }
    assert {p.name for p in out.iterdir()} == expected
    for path in out.iterdir():
        assert path.stat().st_size > 5_000, path.name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200, path.name

    # logged to the newest sweep of the first experiment, and to no other run
    client = MlflowClient(store.uri)
    logged = {Path(a.path).name for a in client.list_artifacts(store.sweep.run_id, "plots")}
    assert logged == expected
    for other in (store.old_sweep, store.ablations):
        assert client.list_artifacts(other.run_id, "plots") == []
    assert "skipped: IoU scatter plots: 11 of 12 runs" in done.stdout


def test_cli_error_is_one_line(store: Store):
    done = _compare("--experiment", "fold_sweeep", "--tracking-uri", store.uri)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"compare.py: MLflow experiment 'fold_sweeep' does not exist in {store.uri}; existing "
        "experiments: ablations, Default, flat, fold_sweep (pass one with --experiment)"
    ]


def test_curve_table_lists_each_run_at_its_evaluation_steps(store: Store, tmp_path: Path):
    run = store.children[SCATTER_RUN]
    out = tmp_path / "curves.md"
    done = _compare(
        "--tracking-uri",
        store.uri,
        "--runs",
        run,
        "--curves-md",
        str(out),
        "--curve-metrics",
        "teacher/AP,pseudo/cls_per_image,loss/unsup_cls",
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()[2:]]
    teacher_ap = TEACHER_AP[("soft_teacher_jitter", 10.0)][FOLDS.index(1)]
    assert [[c.strip() for c in row] for row in rows] == [
        [SCATTER_RUN, "4", f"{teacher_ap * 0.4:.1f}", "6.0", "0.100"],
        [SCATTER_RUN, "10", f"{teacher_ap:.1f}", "12.0", "0.045"],
    ]
