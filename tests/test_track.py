"""Experiment tracking against a real MLflow sqlite store on disk, and the fold tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import sqlalchemy.exc
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from softteacher.config import ExperimentConfig
from softteacher.track import mlflow_runs
from softteacher.track.datasets import DataSplit, log_data_inputs
from softteacher.track.mlflow_runs import (
    RunRef,
    find_child_run,
    find_or_start_child_run,
    finish_run,
    log_file_artifact,
    log_final_metrics,
    log_json_artifact,
    log_metrics,
    resume_parent_run,
    run_status,
    sanitize_key,
    start_parent_run,
)
from softteacher.track.provenance import cpu_description, git_commit
from softteacher.track.stores import TrackingError, default_tracking_uri
from softteacher.track.tables import (
    DuplicateFoldError,
    TrialResult,
    format_markdown,
    format_table,
    log_tables_to_run,
    summarize,
    table_metrics,
    write_tables,
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """One store for the file: creating a sqlite store runs MLflow's migrations (~1 s)."""
    return tmp_path_factory.mktemp("mlflow_store")


@pytest.fixture
def uri(store_dir: Path) -> str:
    return f"sqlite:///{store_dir}/mlflow.db"


@pytest.fixture
def experiment(request) -> str:
    """Each test its own experiment in the shared store, so runs never mix."""
    return f"exp-{request.node.name}"


def _trial_params(fold: int) -> dict[str, object]:
    return {
        "ratio": 10.0,
        "fold": fold,
        "method": "soft_teacher_jitter",
        "seed": 7,
        **ExperimentConfig().flat(),
    }


def _children(uri: str, parent: RunRef):
    return MlflowClient(uri).search_runs(
        [parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )


def test_parent_and_children_hold_params_step_and_final_metrics(uri, experiment):
    parent = start_parent_run(uri, experiment, "sweep", {"preset": "smoke"}, tags={"who": "t"})
    for fold in (1, 2):
        child = find_or_start_child_run(parent, f"trial-f{fold}", _trial_params(fold))
        for step in (0, 10, 20):
            log_metrics(child, {"loss/sup_cls": 1.0 / (step + 1), "lr": 0.01 * fold}, step)
        log_final_metrics(child, {"teacher/AP": 30.0 + fold, "student/AP": 29.0 + fold})
        finish_run(child)
    finish_run(parent)

    client = MlflowClient(uri)
    kind = client.get_experiment(parent.experiment_id).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"  # the UI opens on the runs table
    children = {run.info.run_name: run for run in _children(uri, parent)}
    assert sorted(children) == ["trial-f1", "trial-f2"]
    second = children["trial-f2"]
    assert second.data.params["fold"] == "2"
    assert second.data.params["method"] == "soft_teacher_jitter"
    assert second.data.params["method.cls_thr"] == "0.9"  # from the flat config
    assert len(second.data.params) == len(_trial_params(2))
    assert second.data.metrics["final/teacher/AP"] == 32.0
    assert second.info.status == "FINISHED"
    history = client.get_metric_history(second.info.run_id, "loss/sup_cls")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (10, 1 / 11), (20, 1 / 21)]
    parent_run = client.get_run(parent.run_id)
    assert parent_run.data.params == {"preset": "smoke"}
    assert parent_run.data.tags["who"] == "t"
    assert run_status(parent) == "FINISHED"


def test_params_beyond_one_batch_and_overlong_values_are_logged(uri, experiment):
    parent = start_parent_run(uri, experiment, "sweep", {})
    many = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 7000}
    child = find_or_start_child_run(parent, "trial", many)
    params = MlflowClient(uri).get_run(child.run_id).data.params
    assert len(params) == 251 and params["p249"] == "249"
    assert len(params["long"]) == 6000 and params["long"].endswith("...[cut]")


def test_resumed_child_is_reused_and_finished_child_returned_as_is(uri, experiment):
    parent = start_parent_run(uri, experiment, "sweep", {})
    first = find_or_start_child_run(parent, "trial-a", _trial_params(1))
    finish_run(first, "FAILED")  # the trial was interrupted

    again = find_or_start_child_run(parent, "trial-a", _trial_params(1))  # same params: fine
    assert again == first
    assert run_status(again) == "RUNNING"
    assert len(_children(uri, parent)) == 1

    changed = find_or_start_child_run(parent, "trial-a", {**_trial_params(1), "seed": 8})
    run = MlflowClient(uri).get_run(changed.run_id)
    assert run.data.params["seed"] == "7"
    assert run.data.tags["changed_on_resume/seed"] == "8"

    finish_run(again)
    done = find_or_start_child_run(parent, "trial-a", {"new_param": 1})
    assert done == first and run_status(done) == "FINISHED"
    assert "new_param" not in MlflowClient(uri).get_run(done.run_id).data.params

    other_parent = start_parent_run(uri, experiment, "sweep-2", {})
    assert find_or_start_child_run(other_parent, "trial-a", {}).run_id != first.run_id


def test_resume_parent_run_finds_the_newest_sweep_of_that_name(uri, experiment):
    assert resume_parent_run(uri, "no-such-experiment", "sweep") is None
    assert resume_parent_run(uri, experiment, "sweep") is None
    done = start_parent_run(uri, experiment, "sweep", {})
    finish_run(done)
    assert resume_parent_run(uri, experiment, "sweep") == done  # a rerun of a finished sweep

    interrupted = start_parent_run(uri, experiment, "sweep", {})
    finish_run(interrupted, "KILLED")
    child = find_or_start_child_run(interrupted, "sweep", {})  # a child of the same name
    finish_run(child, "FAILED")
    resumed = resume_parent_run(uri, experiment, "sweep")
    assert resumed == interrupted
    assert run_status(resumed) == "RUNNING"


def test_non_finite_metric_values_are_skipped(uri, experiment):
    run = start_parent_run(uri, experiment, "sweep", {})
    log_metrics(run, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 2.5}, step=3)
    assert MlflowClient(uri).get_run(run.run_id).data.metrics == {"d": 2.5}


def test_artifacts_live_next_to_the_db_not_in_the_cwd(
    tmp_path, store_dir, uri, experiment, monkeypatch
):
    elsewhere = tmp_path / "ray_worker_cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = start_parent_run(uri, experiment, "sweep", {})
    payload = {"teacher": {"AP": 31.2}, "checkpoint": "/ckpt/final.pt"}
    log_json_artifact(run, "summary", payload)
    note = tmp_path / "note.txt"
    note.write_text("checkpoint at /ckpt/final.pt\n")
    log_file_artifact(run, note, artifact_path="checkpoint")

    stored = store_dir / "mlartifacts" / run.run_id / "artifacts"
    assert json.loads((stored / "summary.json").read_text()) == payload
    assert (stored / "checkpoint" / "note.txt").exists()
    assert list(elsewhere.iterdir()) == []
    downloaded = MlflowClient(uri).download_artifacts(run.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text()) == payload
    with pytest.raises(ValueError, match="plain file name"):
        log_json_artifact(run, "sub/summary.json", payload)


def test_deleted_experiment_is_a_one_line_error(uri, experiment):
    run = start_parent_run(uri, experiment, "sweep", {})
    MlflowClient(uri).delete_experiment(run.experiment_id)
    with pytest.raises(TrackingError, match="is deleted; restore it"):
        start_parent_run(uri, experiment, "sweep", {})


def test_a_moved_store_is_a_one_line_error_not_writes_to_the_old_folder(tmp_path, experiment):
    """MLflow records a local store's artifact folder as an absolute path: a results folder
    moved elsewhere would go on writing into the old one."""
    old, new = tmp_path / "results", tmp_path / "moved"
    old.mkdir()
    start_parent_run(f"sqlite:///{old / 'mlflow.db'}", experiment, "sweep", {})
    shutil.move(old, new)
    moved = f"sqlite:///{new / 'mlflow.db'}"
    for use in (
        lambda: resume_parent_run(moved, experiment, "sweep"),
        lambda: start_parent_run(moved, experiment, "another", {}),
    ):
        with pytest.raises(TrackingError, match=f"moved or copied from {old}: .* new store"):
            use()
    assert not old.exists()  # nothing written there
    fresh = f"sqlite:///{new / 'fresh.db'}"  # the fix the message gives
    assert resume_parent_run(fresh, experiment, "sweep") is None
    start_parent_run(fresh, experiment, "sweep", {})


def test_finish_run_refuses_an_unknown_status():
    with pytest.raises(ValueError, match="not one of"):
        finish_run(RunRef("sqlite:////nowhere.db", "0", "0"), "DONE")


def test_default_tracking_uri_honours_env_and_is_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri(tmp_path) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    expected = tmp_path.resolve() / "results" / "mlflow.db"
    assert default_tracking_uri(Path("results")) == f"sqlite:///{expected}"
    assert default_tracking_uri(Path("results")).startswith("sqlite:////")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_git_commit_in_and_outside_a_checkout(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(outside) == "unknown"

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    (repo / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert git_commit(repo) == head and len(head) == 40
    (repo / "untracked.txt").write_text("x\n")
    assert git_commit(repo) == head  # like `git describe --dirty`: tracked files only
    (repo / "a.txt").write_text("two\n")
    assert git_commit(repo) == f"{head}+dirty"

    monkeypatch.setenv("PATH", str(outside))  # no git executable at all
    assert git_commit(repo) == "unknown"


def test_sanitize_key():
    assert (
        sanitize_key("table/1%/soft_teacher_jitter/teacher_AP_mean")
        == "table/1pct/soft_teacher_jitter/teacher_AP_mean"
    )
    assert sanitize_key("loss/sup_cls") == "loss/sup_cls"
    assert sanitize_key("0@10:AP(val)") == "0_at_10_AP_val_"
    assert sanitize_key("/a//./b/../c/") == "a/b/__/c"
    assert len(sanitize_key("k" * 300)) == 250
    with pytest.raises(ValueError):
        sanitize_key("/./")


def test_lock_errors_are_retried_and_others_raised_at_once(monkeypatch):
    monkeypatch.setattr(mlflow_runs.time, "sleep", lambda s: None)
    calls = []

    def locked_twice(x):
        calls.append(x)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert mlflow_runs.with_lock_retry(locked_twice, 4) == 8 and len(calls) == 3

    def broken():
        calls.append("broken")
        raise MlflowException("no such run")

    calls.clear()
    with pytest.raises(MlflowException, match="no such run"):
        mlflow_runs.with_lock_retry(broken)
    assert calls == ["broken"]


def test_a_run_that_loses_the_race_to_insert_a_dataset_links_the_winners(
    tmp_path, uri, experiment, monkeypatch
):
    """Two trials starting at once both insert the same dataset; sqlite refuses the second
    insert on its unique key (CI saw a shared burn-in's Soft Teacher trial die of it)."""
    parent = start_parent_run(uri, experiment, "sweep", {})
    winner, loser = (find_or_start_child_run(parent, name, {}) for name in ("a", "b"))
    split = DataSplit("10% fold 1 labeled", "d1g357", tmp_path / "l.json", 6, "training")
    log_data_inputs(winner, [split])

    real_log_inputs = MlflowClient.log_inputs
    tries = []

    def insert_lost_once(self, run_id, datasets=None, models=None):
        tries.append(run_id)
        if len(tries) == 1:  # what sqlite raised: the winner's row landed first
            integrity = sqlalchemy.exc.IntegrityError("INSERT INTO datasets", {}, None)
            raise MlflowException(str(integrity)) from integrity
        return real_log_inputs(self, run_id, datasets=datasets)

    monkeypatch.setattr(MlflowClient, "log_inputs", insert_lost_once)
    log_data_inputs(loser, [split])
    assert tries == [loser.run_id, loser.run_id]
    client = MlflowClient(uri)
    linked = [
        [(i.dataset.name, i.dataset.digest) for i in client.get_run(r.run_id).inputs.dataset_inputs]
        for r in (winner, loser)
    ]
    assert linked == [[("10% fold 1 labeled", "d1g357")]] * 2

    def refused(self, run_id, datasets=None, models=None):
        raise MlflowException("no such run")

    monkeypatch.setattr(MlflowClient, "log_inputs", refused)
    with pytest.raises(MlflowException, match="no such run"):
        log_data_inputs(loser, [split])


def _result(fold, teacher, student, method="soft_teacher_jitter", ratio=1.0, fg=0.9, var=0.02):
    return TrialResult(ratio, fold, method, fg, var, {"teacher/AP": teacher, "student/AP": student})


THREE_FOLDS = [_result(3, 31.0, 30.0), _result(1, 30.0, 29.5), _result(2, 32.5, 30.4)]


def test_summarize_mean_and_sample_std_over_folds():
    (summary,) = summarize(THREE_FOLDS)
    assert summary.folds == (1, 2, 3) and summary.n_folds == 3
    assert summary.means["teacher/AP"] == pytest.approx(31.166666666666668)
    assert summary.stds["teacher/AP"] == pytest.approx(statistics.stdev([30.0, 32.5, 31.0]))
    assert summary.stds["teacher/AP"] == pytest.approx(1.2583057392117916)  # ddof=1, not 0
    assert summary.per_fold["student/AP"] == (29.5, 30.4, 30.0)

    (single,) = summarize([_result(1, 20.0, 19.0)])
    assert single.stds == {"teacher/AP": 0.0, "student/AP": 0.0}


def test_summarize_groups_settings_and_orders_them():
    results = [
        _result(1, 30.0, 29.0, method="soft_teacher_jitter"),
        _result(1, 25.0, 24.0, method="supervised"),
        _result(2, 27.0, 26.0, method="supervised"),
        _result(1, 28.0, 27.0, fg=0.8),
        _result(1, 10.0, 9.0, ratio=0.5),
    ]
    summaries = summarize(results)
    keys = [(s.ratio, s.method, s.cls_thr, s.n_folds) for s in summaries]
    assert keys == [
        (0.5, "soft_teacher_jitter", 0.9, 1),
        (1.0, "supervised", 0.9, 2),
        (1.0, "soft_teacher_jitter", 0.8, 1),
        (1.0, "soft_teacher_jitter", 0.9, 1),
    ]
    assert summaries[1].means["teacher/AP"] == 26.0


def test_summarize_leaves_out_missing_and_nan_values_and_refuses_duplicates():
    results = [
        TrialResult(1.0, 1, "supervised", 0.9, 0.02, {"student/AP": 20.0}),
        TrialResult(1.0, 2, "supervised", 0.9, 0.02, {"student/AP": math.nan}),
        TrialResult(1.0, 3, "supervised", 0.9, 0.02, {"student/AP": 22.0}),
    ]
    (summary,) = summarize(results)
    assert summary.means == {"student/AP": 21.0}
    assert summary.per_fold == {"teacher/AP": (None, None, None), "student/AP": (20.0, None, 22.0)}
    assert "| - |" in format_markdown([summary])
    with pytest.raises(DuplicateFoldError, match="fold 1 .* appears twice"):
        summarize([*results, results[0]])


def test_format_table_is_aligned_with_mean_pm_std_cells():
    text = format_table(summarize(THREE_FOLDS + [_result(1, 25.0, 24.0, method="supervised")]))
    lines = text.splitlines()
    assert lines[0].split("  ")[0] == "ratio %"
    assert "teacher mAP" in lines[0] and "student mAP" in lines[0]
    assert len(lines) == 4  # header, rule, two settings
    assert "31.17 +- 1.26" in lines[3] and "25.00 +- 0.00" in lines[2]
    assert lines[2].index("25.00") == lines[3].index("31.17")  # columns line up


def test_write_tables_parse_back(tmp_path):
    summaries = summarize(THREE_FOLDS)
    paths = write_tables(summaries, tmp_path / "results", stem="fold_table")
    assert set(paths) == {"csv", "json", "md"}

    with paths["csv"].open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["teacher_AP_mean"]) == pytest.approx(summaries[0].means["teacher/AP"])
    assert float(row["student_AP_std"]) == pytest.approx(summaries[0].stds["student/AP"])
    assert row["folds"] == "1 2 3" and row["method"] == "soft_teacher_jitter"

    (record,) = json.loads(paths["json"].read_text())
    assert record["per_fold"]["teacher/AP"] == [30.0, 32.5, 31.0]
    assert record["folds"] == [1, 2, 3]

    md = paths["md"].read_text().splitlines()
    assert md[0].startswith("| ratio % | method |") and md[1].startswith("|---|")
    assert [cell.strip() for cell in md[2].strip("|").split("|")][-2] == "31.17 +- 1.26"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "fold_table.csv",
        "fold_table.json",
        "fold_table.md",
    ]  # no temporary files left behind


def test_table_is_logged_to_the_parent_run(tmp_path, store_dir, uri, experiment):
    summaries = summarize(THREE_FOLDS)
    parent = start_parent_run(uri, experiment, "sweep", {})
    log_tables_to_run(parent, summaries, write_tables(summaries, tmp_path / "results"))
    metrics = MlflowClient(uri).get_run(parent.run_id).data.metrics
    key = "table/1pct/soft_teacher_jitter/cls0.9_reg0.02/teacher_AP_mean"
    assert set(table_metrics(summaries)) == set(metrics)
    assert metrics[key] == pytest.approx(summaries[0].means["teacher/AP"])
    stored = store_dir / "mlartifacts" / parent.run_id / "artifacts" / "tables"
    assert sorted(p.name for p in stored.iterdir()) == [
        "fold_table.csv",
        "fold_table.json",
        "fold_table.md",
    ]


def test_stopped_trials_are_counted_apart_and_never_averaged_in(tmp_path):
    stopped = dataclasses.replace(_result(3, 2.0, 1.0), stopped_at=150)
    (summary,) = summarize([_result(1, 30.0, 29.0), _result(2, 32.0, 31.0), stopped])
    assert summary.folds == (1, 2) and summary.n_stopped == 1
    assert summary.means["teacher/AP"] == pytest.approx(31.0)
    assert "stopped early" in format_table([summary])
    paths = write_tables([summary], tmp_path)
    with paths["csv"].open() as handle:
        assert next(csv.DictReader(handle))["n_stopped"] == "1"
    assert "stopped early" not in format_table(summarize([_result(1, 30.0, 29.0)]))


def test_find_child_run_by_name(uri, experiment):
    parent = start_parent_run(uri, experiment, "sweep", {})
    assert find_child_run(parent, "r10-f1") is None
    child = find_or_start_child_run(parent, "r10-f1", params={})
    assert find_child_run(parent, "r10-f1") == child


def test_the_cpu_is_named_with_the_isa_torch_runs_its_kernels_with(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    isa = torch.backends.cpu.get_cpu_capability()
    assert cpu_description(cpuinfo) == f"AMD EPYC 9654 96-Core Processor ({isa})"
    assert cpu_description(tmp_path / "missing") == f"unknown CPU ({isa})"
