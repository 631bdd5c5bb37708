"""The platform end to end: the fold-sweep command on a real Ray cluster on loopback, its
MLflow store and its table; a rerun resumes instead of training again; a failed trial
fails the sweep (exit code, MLflow status) and stays out of the table; seeds replicate."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from softteacher.data.synthetic import generate_synthetic_coco
from softteacher.presets import preset
from softteacher.run.spec import WorkerResources
from softteacher.track.mlflow_runs import PARENT_TAG as PARENT
from softteacher.track.models import model_name
from softteacher.tune.grid import SweepSettings, split_shared_burn_in
from softteacher.tune.sweep import SweepResult, run_sweep

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--preset",
        "smoke",
        "--ratios",
        "10",
        "--folds",
        "1",
        "--baseline",
        "--results-dir",
        str(tmp_path / "results"),
        "--data-dir",
        str(tmp_path / "data"),
        "--num-cpus",
        "4",
        "--dashboard-port",
        str(_free_port()),
        *extra,
    ]


def _sweep_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # smoke trials last seconds
    return env


def _sweep_signalled_at(
    tmp_path: Path, line_start: str, sig: signal.Signals, *extra: str
) -> tuple[str, list[int], int, set[tuple[str, int]]]:
    """Runs the command until it prints a line starting with ``line_start``, then sends it
    ``sig``: SIGINT to its process group, as a terminal's Ctrl-C does, SIGKILL to the driver
    alone. Returns what it printed, the pids of the processes it had started (its cluster),
    its exit code, and the addresses its dashboard's port listened on before the signal."""
    command = [sys.executable, str(ROOT / "experiments" / "fold_sweep.py")]
    command += _sweep_args(tmp_path, *extra)
    driver = subprocess.Popen(
        command, env=_sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        # as from a terminal: pytest-xdist's workers ignore SIGINT, which a child inherits
        # (and Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    printed = []
    try:
        for line in driver.stdout:
            printed.append(line)
            if line.startswith(line_start):
                break
        started = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
        dashboard = re.search(r"Ray dashboard: http://[^:]+:(\d+)", "".join(printed))
        listening = _listening_on(int(dashboard.group(1))) if dashboard else set()
        if sig == signal.SIGINT:
            os.killpg(driver.pid, sig)
        else:
            driver.send_signal(sig)
        printed += driver.stdout.readlines()
        driver.wait(timeout=120)
    finally:
        driver.kill()
        driver.wait(timeout=60)
    return "".join(printed), started, driver.returncode, listening


def _listening_on(port: int, timeout_s: float = 30.0) -> set[str]:
    """The addresses that listen on ``port`` once any does (the dashboard's HTTP server
    may bind after Ray printed its URL)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {
            c.laddr.ip
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.mark.slow
def test_sweep_command_killed_mid_trial_resumes_on_the_same_command(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    """The one end-to-end command: a supervised trial, then a Soft Teacher trial branched
    off its end-of-burn-in checkpoint, the driver SIGKILLed while that trial trains, and the
    same command again: the finished trial is not rerun, the other finishes, MLflow holds
    one parent and two children, all FINISHED, and the table both rows. (The rerun uses
    the tests' own cluster: the command's own start-up is the first run's.)"""
    first, started, _, listening = _sweep_signalled_at(
        tmp_path,
        "[start] 10% fold 1 soft_teacher",
        signal.SIGKILL,
        "--shared-burn-in",
        "--num-cpus",
        "2",  # one trial at a time: the Soft Teacher trial starts after the supervised one
    )
    assert "Ray dashboard: http://127.0.0.1:" in first
    # the dashboard (it accepts jobs: code to run) listens on loopback only; Ray's own gRPC
    # servers listen on every interface in Ray 2.60, guarded by its token (README)
    assert listening == {"127.0.0.1"}
    assert "shared burn-in: 1 run(s) first, then 1 semi-supervised run(s)" in first
    assert first.count("[done]") == 1 and "[done]  10% fold 1 supervised" in first
    assert started

    import fold_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    fold_sweep.main(_sweep_args(tmp_path, "--shared-burn-in"))  # exits only on a failure
    again = capsys.readouterr().out
    assert "resuming sweep" in again
    # The Soft Teacher trial resumes. The finished supervised trial is not trained again:
    # its next trial started at once in its reused process, so the kill can land before
    # Tune's saved state records its end; restored, it re-reports its FINISHED MLflow run
    # (checked below: one logged model, each step logged once).
    assert again.count("[start] 10% fold 1 soft_teacher") == 1
    assert again.count("[done]  10% fold 1 soft_teacher") == 1
    # the progress counts the whole sweep, the trial that ended before the kill included
    assert "[sweep] 2/2 trials ended" in again

    results = tmp_path / "results"
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fold_sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["method"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(runs) == 3  # the parent and the killed trial's child reused, not duplicated
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert set(children) == {"supervised", "soft_teacher_jitter"}
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        assert "final/teacher/AP" in child.data.metrics
        assert "final/student/AP50" in child.data.metrics
        assert "system/cpu_utilization_percentage" in child.data.metrics
    supervised, soft = children["supervised"], children["soft_teacher_jitter"]
    for child, lists in ((supervised, 2), (soft, 3)):  # the Dataset column of the runs table
        inputs = {d.dataset.name: d for d in child.inputs.dataset_inputs}
        assert len(inputs) == lists and inputs["val"].tags[0].value == "evaluation"
        assert inputs["10% fold 1 labeled"].tags[0].value == "training"
    labeled = {d.dataset.name: d.dataset.digest for d in soft.inputs.dataset_inputs}
    assert labeled == {
        d.dataset.name: d.dataset.digest for d in supervised.inputs.dataset_inputs
    } | {"10% fold 1 unlabeled": labeled["10% fold 1 unlabeled"]}  # the same split, the same digest
    assert client.get_metric_history(soft.info.run_id, "pseudo/cls_per_image")
    # each trial's final teacher is a READY logged model, its mAP linked to it and the val set
    models = client.search_logged_models(
        [experiment.experiment_id],
        order_by=[{"field_name": "metrics.final/teacher/AP", "ascending": False}],
    )
    assert {m.source_run_id for m in models} == {supervised.info.run_id, soft.info.run_id}
    for model in models:
        run = client.get_run(model.source_run_id)
        linked = {m.key: m for m in model.metrics}
        assert linked["final/teacher/AP"].value == run.data.metrics["final/teacher/AP"]
        assert linked["final/teacher/AP"].dataset_name == "val"
        assert model.name == model_name(run.info.run_name)
        assert model.status == LoggedModelStatus.READY
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    burn_in = preset("smoke").method.burn_in_steps
    branch = Path(soft.data.params["train.branch_from"])
    assert branch.parent.name.endswith(supervised.info.run_name)
    steps = [m.step for m in client.get_metric_history(soft.info.run_id, "loss/total")]
    assert min(steps) > burn_in  # it trained its semi-supervised phase only
    assert len(steps) == len(set(steps))  # and logged each step once, kill or not
    steps = [m.step for m in client.get_metric_history(supervised.info.run_id, "loss/total")]
    assert len(steps) == len(set(steps))
    baseline_steps = client.get_metric_history(supervised.info.run_id, "loss/total")
    assert min(m.step for m in baseline_steps) <= burn_in
    # checkpoints at steps 4 (burn-in), 6 and 12: Ray keeps the last 2, the branch point apart
    kept = [p for p in branch.parent.glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == preset("smoke").train.keep_checkpoints
    assert branch.name == "branch_point"

    tables = list(results.glob("*_table.csv"))
    assert len(tables) == 1
    with tables[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["method"] for row in rows} == {"supervised", "soft_teacher_jitter"}

    # the results folder moved elsewhere: its MLflow store (artifacts at absolute paths in
    # the old folder) is refused in one line, and with a new store (MLFLOW_TRACKING_URI; a
    # deleted one reads the same) the same command resumes from the moved folder, logs the
    # finished trials into the new store from Ray's results, and never touches the old one
    finals = {m: c.data.metrics["final/teacher/AP"] for m, c in children.items()}
    moved = tmp_path / "moved"
    shutil.move(results, moved)
    with pytest.raises(SystemExit) as refused:
        fold_sweep.main(_sweep_args(tmp_path, "--shared-burn-in", "--results-dir", str(moved)))
    assert refused.value.code == 2
    assert f"moved or copied from {results}: " in capsys.readouterr().err
    (tmp_path / "new").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    capsys.readouterr()
    fold_sweep.main(_sweep_args(tmp_path, "--shared-burn-in", "--results-dir", str(moved)))
    rebuilt_out = capsys.readouterr().out
    assert f"resuming sweep from {moved}" in rebuilt_out
    assert rebuilt_out.count("finished in Ray's results, not in MLflow; logged again") == 2
    assert rebuilt_out.count("[start]") == 0  # nothing trained again
    assert not results.exists() and len(list(moved.glob("*_table.csv"))) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fold_sweep")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    rebuilt = {r.data.params["method"]: r for r in runs if r is not parent}
    assert len(runs) == 3 and parent.info.status == "FINISHED"
    for method, child in rebuilt.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and "rebuilt_from" in child.data.tags
        assert child.data.metrics["final/teacher/AP"] == finals[method]
        assert child.data.params["train.max_steps"] == str(preset("smoke").train.max_steps)

    # the killed driver's cluster went with it: its raylet and GCS at once; Ray's dashboard
    # and runtime-env agents see their raylet die at once too, but first try to report it
    # to the dead GCS, for its 60 s reconnect timeout (61-141 s measured), so they are
    # checked last
    assert _still_running(started) == []


@pytest.mark.slow
def test_ctrl_c_ends_the_sweep_and_its_runs_killed_with_one_message(tmp_path):
    """A shared burn-in's two trials started side by side, the Soft Teacher one waiting for
    the supervised one's branch point, then training; Ctrl-C at its first evaluation: exit
    130 with one message saying how to resume, the sweep's MLflow run and the interrupted
    trial's KILLED (Tune's own handler ended the sweep as if done instead, the interrupted
    trial tagged as stopped early by a scheduler it did not have)."""
    printed, _, code, _ = _sweep_signalled_at(
        tmp_path, "[eval]  10% fold 1 soft_teacher", signal.SIGINT, "--shared-burn-in",
        # 48 steps left after that evaluation, for a driver that prints late under load;
        # clipped, since a smoke Soft Teacher trial diverges by step 22 without
        "--max-steps", "60", "--set", "optim.grad_clip_norm=10",
    )
    assert code == 130, printed[-3000:]
    events = [line for line in printed.splitlines() if line.startswith("[")]
    started = events.index("[start] 10% fold 1 soft_teacher_jitter cls_thr 0.5 reg_thr 0.02")
    supervised_done = [i for i, e in enumerate(events) if e.startswith("[done]  10% fold 1 sup")]
    assert all(started < i for i in supervised_done)  # the two trials ran side by side
    last = printed.strip().splitlines()[-1]
    assert "interrupted" in last and "Rerun the same command to resume" in last, printed[-3000:]
    assert "Traceback" not in printed and "_table" not in printed  # no table of a part
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fold_sweep").experiment_id])
    status = {r.data.params.get("method", "sweep"): r.info.status for r in runs}
    assert status["sweep"] == "KILLED" and status["soft_teacher_jitter"] == "KILLED", status
    assert status["supervised"] in ("FINISHED", "KILLED") and len(runs) == 3
    assert not any("stopped_early" in r.data.tags for r in runs)


def _still_running(pids: list[int], timeout_s: float = 180.0) -> list[str]:
    """The command lines of ``pids`` still running after up to ``timeout_s`` (a zombie,
    which only its new parent has yet to reap, counts as ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    running.append(" ".join(process.cmdline()[:3]))
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(1.0)


def test_a_failed_trial_fails_the_sweep_and_its_mlflow_runs(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = SweepSettings(
        preset="smoke",
        ratios=(10.0,),
        folds=(1,),
        methods=("supervised",),
        overrides=(f"train.init_from={tmp_path / 'no-such-checkpoint'}",),
        results_dir=str(tmp_path / "results"),
        data_dir=str(tmp_path / "data"),
        # in process, the CPU default (test_session.py has the restart stopping on the
        # marker; test_ray_train.py a Ray Train worker's restart)
        resources=WorkerResources(num_workers=0, cpus_per_worker=1, max_failures=1),
    )
    result = run_sweep(settings)

    assert not result.ok and result.finished == [] and len(result.failed) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fold_sweep").experiment_id])
    statuses = {("child" if PARENT in r.data.tags else "parent"): r for r in runs}
    assert statuses["parent"].info.status == "FAILED"
    assert statuses["child"].info.status == "FAILED"
    # the worker's one-line message, not Ray's wrapped traceback; the restarts stopped on it
    error = statuses["child"].data.tags["error"]
    assert error.startswith("RunInputError: FileNotFoundError: train.init_from: no ")
    assert "no-such-checkpoint" in error
    with next((tmp_path / "results").glob("*_table.csv")).open() as handle:
        assert list(csv.DictReader(handle)) == []  # a failed trial is never averaged in


# COCO 2017's category ids: 80 of 1-90, with gaps
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)


def _coco_2017_root(tmp_path: Path) -> Path:
    """The smoke preset's synthetic set laid out as COCO 2017 is: ``train2017/``,
    ``val2017/`` and ``annotations/``, zero-padded file names, COCO's 80 categories with
    their gaps (the four shapes under ids 3, 17, 62 and 90, so no label equals its id),
    polygons and one crowd box."""
    source = generate_synthetic_coco(tmp_path / "synthetic", preset("smoke").synthetic)
    shape_ids = dict(zip((1, 2, 3, 4), (3, 17, 62, 90), strict=True))
    assert len(COCO_CATEGORY_IDS) == 80 and set(shape_ids.values()) <= set(COCO_CATEGORY_IDS)
    root = tmp_path / "coco"
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        content = json.loads(source.ann_file(split).read_text())
        (root / folder).mkdir(parents=True)
        for image in content["images"]:
            name = f"{image['id']:012d}.jpg"
            shutil.copy(source.image_dir(split) / image["file_name"], root / folder / name)
            image["file_name"] = name
        content["categories"] = [
            {"id": i, "name": f"category {i}", "supercategory": "thing"} for i in COCO_CATEGORY_IDS
        ]
        for annotation in content["annotations"]:
            annotation["category_id"] = shape_ids[annotation["category_id"]]
            x, y, w, h = annotation["bbox"]
            annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        crowd = content["annotations"][0] | {"id": 10**6, "iscrowd": 1}
        content["annotations"].append(crowd)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(content))
    return root


def test_a_coco_root_trains_and_scores_a_soft_teacher_trial(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    """The user's path to real COCO: ``--coco-root`` with a CPU preset. The detector takes
    the dataset's 80 classes, the folds are made from the root's train file, and a Soft
    Teacher trial trains on its labeled and unlabeled images and is scored on val2017."""
    import fold_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = _coco_2017_root(tmp_path)
    results, data = tmp_path / "results", tmp_path / "data"
    fold_sweep.main(
        ["--preset", "smoke", "--ratios", "10", "--folds", "1", "--method", "soft_teacher_jitter"]
        + ["--coco-root", str(root), "--results-dir", str(results), "--data-dir", str(data)]
        + ["--max-steps", "6"]  # 4 of burn-in, 2 with the unlabeled images
    )
    printed = capsys.readouterr().out
    assert "has 80 categories and the smoke preset's detector 4: adding --set " in printed
    assert "fold 1@10%: 6 labeled, 54 unlabeled images" in printed
    assert "[done]  10% fold 1 soft_teacher_jitter" in printed, printed[-3000:]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fold_sweep").experiment_id])
    child = next(r for r in runs if PARENT in r.data.tags)
    assert child.info.status == "FINISHED" and child.data.params["detector.num_classes"] == "80"
    assert "final/teacher/AP" in child.data.metrics
    assert client.get_metric_history(child.info.run_id, "pseudo/cls_per_image")
    with next(results.glob("*_table.csv")).open() as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["soft_teacher_jitter"]


def test_the_command_exits_non_zero_when_a_trial_failed(monkeypatch, tmp_path):
    import fold_sweep

    monkeypatch.setattr(fold_sweep, "start_or_join", lambda *args: None)
    monkeypatch.setattr(fold_sweep, "run_sweep", lambda settings: SweepResult([], ["r10-f1"]))
    with pytest.raises(SystemExit) as exit_info:
        fold_sweep.main(["--preset", "smoke", "--ratios", "10", "--folds", "1"])
    assert exit_info.value.code == 1


def test_seeds_replicate_every_trial_and_its_baseline():
    settings = SweepSettings(preset="smoke", ratios=(10.0,), folds=(1, 2), seeds=(1, 2))
    settings = dataclasses.replace(settings, baseline=True)
    specs = settings.trial_specs()
    assert len(specs) == 8 and len({s.name for s in specs}) == 8
    assert {(s.method, s.fold, s.seed) for s in specs} == {
        (m, f, seed)
        for m in ("soft_teacher_jitter", "supervised")
        for f in (1, 2)
        for seed in (1, 2)
    }
    assert specs[0].apply(preset("smoke")).train.seed == 1


def test_a_preset_changed_in_code_names_a_new_sweep(monkeypatch):
    """Rerunning the same command resumes; after the preset changed it must not, or the
    resumed MLflow runs would keep the old params."""
    import softteacher.presets as config

    before = SweepSettings(preset="smoke").name
    assert SweepSettings(preset="smoke").name == before
    changed = config.PRESETS["smoke"]().replace(train={"max_steps": 13})
    monkeypatch.setitem(config.PRESETS, "smoke", lambda: changed)
    assert SweepSettings(preset="smoke").name != before


def test_shared_burn_in_runs_a_supervised_trial_first_for_each_ratio_and_fold():
    base = preset("smoke")
    specs = SweepSettings(preset="smoke", ratios=(1.0, 10.0), folds=(1,)).trial_specs()
    roots, branches = split_shared_burn_in(specs, base)
    assert branches == specs
    assert [(s.method, s.ratio, s.fold) for s in roots] == [
        ("supervised", 1.0, 1),
        ("supervised", 10.0, 1),
    ]
    mixed = SweepSettings(
        preset="smoke",
        ratios=(10.0,),
        folds=(1,),
        methods=("soft_teacher", "multi_stage"),
        baseline=True,
    )
    roots, branches = split_shared_burn_in(mixed.trial_specs(), base)
    assert [s.method for s in roots] == ["multi_stage", "supervised"]  # no second baseline
    assert [s.method for s in branches] == ["soft_teacher"]
    branched = dataclasses.replace(branches[0], branch_from="/somewhere/checkpoint_1")
    assert branched == branches[0]  # where a trial starts is not which trial it is
    no_burn_in = base.replace(method={"burn_in_steps": 0})
    with pytest.raises(ValueError, match="burn_in_steps"):
        split_shared_burn_in(roots + branches, no_burn_in)


def test_without_an_address_a_sweep_starts_a_cluster_of_its_own(monkeypatch, capsys):
    """Beside another sweep's cluster, ray.init() would join the newest one and then refuse
    num_cpus; a sweep without --address starts its own, its dashboard on 127.0.0.1 unless
    asked (and then said in one line)."""
    import ray

    from softteacher.tune import cluster

    calls: list[dict] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    cluster.start_or_join(num_cpus=2)
    cluster.start_or_join(address="auto")
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2
    assert calls[0]["dashboard_host"] == "127.0.0.1"
    assert calls[1]["address"] == "auto" and "num_cpus" not in calls[1]
    assert "warning" not in capsys.readouterr().out
    cluster.start_or_join(num_cpus=2, dashboard_host="0.0.0.0")
    assert calls[2]["dashboard_host"] == "0.0.0.0"
    assert capsys.readouterr().out.startswith("warning: --dashboard-host 0.0.0.0: the dashboard")


def test_a_cluster_of_the_sweeps_own_runs_train_without_the_preemption_watcher(monkeypatch):
    """Every Ray process of a sweep polls its Train workers every 0.5 s; on a cluster of the
    sweep's own (no node to drain) Ray Train starts no preemption watcher, on a joined one
    it does; a value the user set in the environment wins."""
    import ray

    from softteacher.tune import cluster

    calls: list[dict] = []
    for key in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(key, "")  # unset, and restored after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    cluster.start_or_join(num_cpus=2)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    cluster.start_or_join(num_cpus=2)
    cluster.start_or_join(address="auto")

    kept, local, joined = (call["runtime_env"]["env_vars"] for call in calls)
    assert kept["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"  # the user's
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in joined
    assert local["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert joined["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # the trial's own runs


def test_both_sweep_commands_read_the_shared_options_alike(tmp_path):
    import ablations
    import fold_sweep

    shared = [
        "--preset", "smoke", "--max-steps", "3", "--set", "method.unsup_weight=2",
        "--results-dir", str(tmp_path), "--workers", "0", "--max-failures", "1",
        "--num-cpus", "4", "--seeds", "0,1,2",
    ]  # fmt: skip
    sweep, table = fold_sweep.parse_args(shared), ablations.parse_args(shared)
    for name in ("preset", "max_steps", "overrides", "results_dir", "workers", "max_failures",
                 "num_cpus", "address", "dashboard_port", "dashboard_host", "coco_root",
                 "data_dir", "seeds", "seed"):  # fmt: skip
        assert getattr(sweep, name) == getattr(table, name), name
    assert fold_sweep.settings_from_args(sweep).seeds == (0, 1, 2)
    assert ablations.settings_from_args(table).sweep.seeds == (0, 1, 2)
    assert ablations.settings_from_args(ablations.parse_args(["--seed", "3"])).sweep.seeds == (3,)
    with pytest.raises(SystemExit):
        fold_sweep.parse_args(["--seeds", "1,1"])  # a seed given twice would count twice
    assert sweep.overrides == ["method.unsup_weight=2"] and sweep.max_steps == 3
    amp = fold_sweep.parse_args(["--set", "train.seed=1", "--amp", "bf16"])
    assert amp.overrides == ["train.seed=1", "detector.amp=bf16"]  # --amp is an override
