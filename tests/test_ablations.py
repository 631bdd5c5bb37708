"""The ablation suite: its tables as data, their printing and files on hand-made results,
and ``experiments/ablations.py`` end to end (one multi-stage row through Ray Tune and a real
MLflow store)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from softteacher.data.coco import load_coco
from softteacher.data.protocol import synthetic_folds
from softteacher.presets import preset
from softteacher.run.spec import WorkerResources
from softteacher.track.tables import summarize
from softteacher.train.checkpoint import save_checkpoint
from softteacher.train.trainer import SoftTeacherTrainer
from softteacher.tune import sweep
from softteacher.tune.ablation_tables import TABLES, AblationError
from softteacher.tune.ablations import (
    AblationSettings,
    collect_rows,
    format_ablation_markdown,
    format_ablation_table,
    run_ablation_table,
    select_tables,
    write_ablation_table,
)
from softteacher.tune.grid import SweepSettings
from softteacher.tune.sweep import FinishedTrial


def ablation(
    *, ratio: float = 10.0, fold: int = 1, branch_from: str | None = None, **sweep
) -> AblationSettings:
    """An ablation request as ``experiments/ablations.py`` builds one from its options."""
    settings = SweepSettings(ratios=(ratio,), folds=(fold,), **sweep)
    return AblationSettings(settings, branch_from=branch_from)


def test_tables_hold_the_papers_rows_and_figures():
    assert list(TABLES) == ["table6", "table7", "table8", "table9", "table10"]
    table6 = TABLES["table6"]
    assert [r.method for r in table6.rows] == [
        "supervised",
        "multi_stage",
        "e2e",
        "e2e_ema",
        "soft_teacher",
        "soft_teacher_jitter",
    ]
    assert [r.paper.mAP for r in table6.rows] == [27.1, 28.7, 30.0, 31.2, 33.6, 34.2]
    assert [r.indicator for r in TABLES["table7"].rows] == [
        "none",
        "iou",
        "reverse_iou",
        "pred_diff",
        "bg_student",
        "bg_teacher",
    ]
    assert [r.paper.mAP for r in TABLES["table7"].rows] == [31.2, 31.7, 31.6, 32.3, 25.9, 33.6]
    assert [r.cls_thr for r in TABLES["table8"].rows] == [0.7, 0.8, 0.9, 0.95]
    assert sorted(r.reg_thr for r in TABLES["table9"].rows) == [0.01, 0.02, 0.03, 0.04]
    assert [(r.n_jitter, r.paper.AP75) for r in TABLES["table10"].rows] == [
        (5, 37.0),
        (10, 37.3),
        (15, 37.4),
    ]


@pytest.mark.parametrize("key", list(TABLES))
def test_each_row_is_its_own_trial_with_the_setting_it_ablates(key):
    settings = ablation(preset="smoke", ratio=10.0, fold=1)
    table = TABLES[key]
    specs = settings.specs(table)
    assert len({s.name for s in specs}) == len(specs)  # no two rows share a trial
    base = preset("smoke")
    for row, spec in zip(table.rows, specs):
        method = spec.apply(base).method
        assert method.method == row.method
        assert method.cls_thr == (row.cls_thr if row.cls_thr is not None else base.method.cls_thr)
        assert method.reg_thr == (row.reg_thr if row.reg_thr is not None else base.method.reg_thr)
        if row.indicator is not None:
            assert method.effective_indicator == row.indicator
        if row.n_jitter is not None:
            assert method.n_jitter == row.n_jitter and method.uses_jitter
    sweep_settings = settings.sweep_settings(table)
    assert sweep_settings.experiment_name == "ablations"
    assert sweep_settings.name == f"ablations-{key}-smoke-r10-f1"


def test_sweep_names_change_with_what_changes_the_trials():
    table = TABLES["table10"]
    names = {
        ablation(preset="cpu").sweep_name(table),
        ablation(preset="cpu", max_steps=4).sweep_name(table),
        ablation(preset="cpu", fold=2).sweep_name(table),
        ablation(preset="cpu").sweep_name(table.select(["5"]), partial=True),
        ablation(preset="cpu", shared_burn_in=True).sweep_name(table),
        ablation(preset="cpu", seeds=(3,)).sweep_name(table),
        ablation(preset="cpu", seeds=(3, 4)).sweep_name(table),
    }
    assert len(names) == 7
    seeded = ablation(preset="cpu", seeds=(3,))
    assert {spec.seed for spec in seeded.specs(table)} == {3}
    assert seeded.table_stem(table).endswith("_s3")
    assert ablation(shared_burn_in=True).sweep_settings(table).shared_burn_in


def test_table_files_of_other_folds_and_schedules_never_overwrite_each_other():
    table = TABLES["table6"]
    stems = [
        ablation(preset="bench").table_stem(table),
        ablation(preset="bench", fold=2).table_stem(table),
        ablation(preset="bench", ratio=5).table_stem(table),
        ablation(preset="bench", max_steps=3500).table_stem(table),
        ablation(preset="bench").table_stem(table.select(["e2e"]), partial=True),
    ]
    assert len(set(stems)) == len(stems)
    assert stems[0] == "ablations_table6_bench_r10_f1"
    assert stems[-1] == "ablations_table6_bench_r10_f1_e2e"


def test_rows_branch_off_a_given_burn_in_checkpoint_except_multi_stage(tmp_path):
    smoke = preset("smoke")
    trainer = SoftTeacherTrainer(smoke, torch.device("cpu"))
    trainer.step_count = smoke.method.burn_in_steps
    save_checkpoint(trainer, tmp_path / "burn_in")
    settings = ablation(preset="smoke", branch_from=str(tmp_path / "burn_in"))
    settings.check_branch_point()
    table = TABLES["table6"]
    specs = settings.specs(table)
    assert {s.method: s.branch_from for s in specs} == {
        row.method: (None if row.method == "multi_stage" else str(tmp_path / "burn_in"))
        for row in table.rows
    }
    assert settings.sweep_name(table) != ablation(preset="smoke").sweep_name(table)

    trainer.step_count += 1
    save_checkpoint(trainer, tmp_path / "later")
    with pytest.raises(AblationError, match="saved at step 5.*ends at step 4"):
        ablation(preset="smoke", branch_from=str(tmp_path / "later")).check_branch_point()
    with pytest.raises(AblationError, match="--branch-from.*no checkpoint.pt"):
        ablation(preset="smoke", branch_from=str(tmp_path)).check_branch_point()
    with pytest.raises(AblationError, match="choose one"):
        ablation(shared_burn_in=True, branch_from=str(tmp_path))


def test_select_tables_filters_tables_and_rows_and_names_mistakes():
    assert [t.key for t in select_tables(None)] == list(TABLES)
    chosen = select_tables("table8,table6", "multi_stage,0.9")
    assert [(t.key, [r.key for r in t.rows]) for t in chosen] == [
        ("table6", ["multi_stage"]),
        ("table8", ["0.9"]),
    ]
    with pytest.raises(AblationError, match="unknown table"):
        select_tables("table11")
    with pytest.raises(AblationError, match=r"row\(s\) \['0.9'\].*table10: 5, 10, 15"):
        select_tables("table10", "0.9")


def _finished(settings, table, values, specs=None) -> list[FinishedTrial]:
    """Hand-made trial results: ``values[i]`` is trial i's teacher mAP (one trial a row
    unless ``specs`` says otherwise), None for no result."""
    trials = []
    for spec, value in zip(specs or settings.specs(table), values, strict=True):
        if value is not None:
            metrics = {
                "teacher/AP": value,
                "teacher/AP50": value + 20.0,
                "teacher/AP75": math.nan,
                "student/AP": 1.0,
            }
            trials.append(FinishedTrial(spec, metrics))
    return trials


def test_table_prints_ours_beside_the_papers_and_marks_missing_rows(tmp_path):
    settings = ablation(preset="smoke")
    table = TABLES["table7"]
    finished = _finished(settings, table, [12.34, None, 3.0, 4.0, 5.0, 6.0])
    rows = collect_rows(table, settings.specs(table), finished)
    text = format_ablation_table(table, rows, settings, wall_s=90.0)
    lines = text.splitlines()
    assert "Table 7" in lines[0] and "1.5 min" in lines[0]
    assert lines[1].split() == [
        "indicator",
        "mAP",
        "AP50",
        "AP75",
        "paper",
        "mAP",
        "paper",
        "AP50",
        "paper",
        "AP75",
    ]
    assert lines[3].split() == ["w/o", "weight", "12.3", "32.3", "-", "31.2", "48.8", "34.0"]
    assert lines[4].split() == ["IoU", "-", "-", "-", "31.7", "51.4", "34.2"]  # did not finish
    assert lines[8].split()[0] == "BG-T"

    paths = write_ablation_table(table, rows, tmp_path, "ablations_table7_smoke", settings)
    assert set(paths) == {"csv", "md"}
    with paths["csv"].open() as handle:
        records = list(csv.DictReader(handle))
    assert [r["row"] for r in records] == [r.key for r in table.rows]
    assert records[0]["label"] == "w/o weight"
    assert float(records[0]["mAP"]) == 12.34 and records[0]["AP75"] == ""
    assert records[1]["mAP"] == "" and float(records[1]["paper_mAP"]) == 31.7
    markdown = paths["md"].read_text()
    assert markdown == format_ablation_markdown(table, rows, settings)
    assert "| BG-T | 6.0 | 26.0 | - | 33.6 | 52.9 | 36.6 |" in markdown


def test_seeds_replicate_every_row_and_the_table_reads_them_against_the_noise(tmp_path):
    settings = ablation(preset="smoke", seeds=(0, 1, 2))
    table = TABLES["table10"]  # jitter counts 5, 10, 15
    specs = settings.specs(table)
    assert [(s.n_jitter, s.seed) for s in specs[:4]] == [(5, 0), (5, 1), (5, 2), (10, 0)]
    values = [10.0, 11.0, 12.0, 13.0, 15.0, 17.0, 20.0, None, 21.0]
    rows = collect_rows(table, specs, _finished(settings, table, values, specs))
    assert [r.mean("teacher/AP") for r in rows] == [11.0, 15.0, 20.5]
    assert [r.std("teacher/AP") for r in rows] == [1.0, 2.0, pytest.approx(0.7071, abs=1e-4)]
    assert [r.finished for r in rows] == [True, True, False]

    text = format_ablation_table(table, rows, settings)
    lines = text.splitlines()
    assert "mean +- std over seeds 0,1,2" in lines[0]
    assert lines[3].split()[:4] == ["5", "11.0", "+-", "1.0"]
    # pooled std sqrt((1 + 4 + 0.5) / 3) = 1.35: rows closer than 2.7 do not differ
    assert lines[-1] == (
        "run-to-run noise (std over seeds, pooled over 3 rows): 1.4 mAP; rows whose means "
        "differ by less than 2.7 do not differ"
    )
    paths = write_ablation_table(table, rows, tmp_path, "ablations_table10_smoke", settings)
    with paths["csv"].open() as handle:
        records = list(csv.DictReader(handle))
    assert records[2]["seeds"] == "0;1;2" and records[2]["finished"] == "2"
    assert float(records[1]["mAP"]) == 15.0 and float(records[1]["mAP_std"]) == 2.0
    assert "run-to-run noise" in paths["md"].read_text()


def test_sweep_table_keeps_indicator_and_jitter_rows_apart():
    """``run_sweep`` summarises every sweep's trials by setting: the rows of Tables 7 and 10
    differ only in the indicator or the jitter count, which must not read as repeated folds."""
    settings = ablation(preset="smoke")
    for key in ("table7", "table10"):
        table = TABLES[key]
        finished = _finished(settings, table, [1.0] * len(table.rows))
        summaries = summarize([sweep.table_row(t) for t in finished])
        assert len(summaries) == len(table.rows)
    labels = {
        s.method
        for s in summarize(
            [sweep.table_row(t) for t in _finished(settings, TABLES["table10"], [1.0] * 3)]
        )
    }
    assert labels == {
        "soft_teacher_jitter+nj5",
        "soft_teacher_jitter+nj10",
        "soft_teacher_jitter+nj15",
    }


@pytest.mark.ray
@pytest.mark.slow
def test_a_multi_stage_row_runs_end_to_end(ray_cluster, tmp_path, monkeypatch):
    """Both stages (in process, the CPU default) and the labeling pass (a Ray task on the
    loopback cluster), the table files, and the MLflow runs (the fold sweep's test covers
    the command line itself; the Ray Train runner has tests of its own)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results, data = tmp_path / "results", tmp_path / "data"
    settings = ablation(
        preset="smoke",
        results_dir=str(results),
        data_dir=str(data),
        resources=WorkerResources(num_workers=0, cpus_per_worker=1),
        max_steps=4,
    )
    (table,) = select_tables("table6", "multi_stage")
    result = run_ablation_table(settings, table)
    assert result.complete

    stem = "ablations_table6_smoke_r10_f1_steps4_multi_stage"
    with (results / f"{stem}.csv").open() as handle:
        (record,) = list(csv.DictReader(handle))
    assert record["label"] == "Multi-Stage" and float(record["paper_mAP"]) == 28.7
    assert 0.0 <= float(record["mAP"]) <= 100.0
    assert "| Multi-Stage |" in (results / f"{stem}.md").read_text()

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablations")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.run_name == "ablations-table6-smoke-r10-f1-steps4-rows-multi_stage"
    assert parent.info.status == "FINISHED"
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert f"tables/{stem}.md" in tables
    assert child.info.status == "FINISHED" and child.data.params["method"] == "multi_stage"
    metrics = child.data.metrics
    assert metrics["multi_stage/unlabeled_images"] == 54  # the smoke fold's unlabeled set
    assert "multi_stage/pseudo_boxes_per_image" in metrics
    assert "multi_stage/stage1/teacher/AP" in metrics and "final/teacher/AP" in metrics
    assert client.get_metric_history(child.info.run_id, "loss/total")[-1].step == 4

    summary_file = client.download_artifacts(child.info.run_id, "summary.json", str(tmp_path))
    summary = json.loads(Path(summary_file).read_text())["multi_stage"]
    assert summary["pseudo_labels"]["cls_thr"] == preset("smoke").method.cls_thr
    assert summary["stage1_checkpoint"] != json.loads(Path(summary_file).read_text())["checkpoint"]
    fold = synthetic_folds(data, preset("smoke").synthetic, [10], [1])[0]  # the cached fold
    merged = load_coco(Path(summary["pseudo_label_file"]), fold.train_images)
    labeled, unlabeled, _ = fold.load()
    assert set(merged.image_ids) == set(labeled.image_ids) | set(unlabeled.image_ids)
    assert sum(len(r.boxes) for r in merged.records) == (
        sum(len(r.boxes) for r in labeled.records) + summary["pseudo_labels"]["boxes_kept"]
    )
