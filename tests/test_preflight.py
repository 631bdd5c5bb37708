"""Bad input is one line before any Ray cluster starts: the config's own range checks,
``--set`` overrides, the pre-flight checks, and both CLIs' exit status 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import ray
import torch

from softteacher import preflight
from softteacher.config import MethodConfig
from softteacher.data.coco import CocoFormatError, CocoSummary
from softteacher.overrides import apply_overrides
from softteacher.preflight import (
    UsageError,
    check_at_least_one,
    check_folds,
    check_labeled_count,
    check_overrides_reach_trials,
    check_ratios,
    check_resources,
    check_sweep,
    check_thresholds,
    choose_dashboard_port,
    coco_class_override,
    placement_warning,
)
from softteacher.presets import preset
from softteacher.run.spec import WorkerResources
from softteacher.train.checkpoint import save_checkpoint
from softteacher.train.trainer import SoftTeacherTrainer
from softteacher.tune.ablation_tables import TABLES
from softteacher.tune.ablations import AblationSettings
from softteacher.tune.grid import SweepSettings

ROOT = Path(__file__).resolve().parents[1]


# --- the config's own checks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("method", {"cls_thr": 1.5}, r"method.cls_thr must be in \[0, 1\], got 1.5; "),
        ("method", {"rpn_thr": -0.1}, r"method.rpn_thr must be in \[0, 1\], got -0.1; "),
        ("method", {"candidate_thr": float("nan")}, r"method.candidate_thr must be in \[0, 1\]"),
        ("method", {"reg_thr": -0.01}, "method.reg_thr must be >= 0, got -0.01; "),
        ("method", {"unsup_weight": -1.0}, "method.unsup_weight must be >= 0, got -1.0; "),
        ("method", {"n_jitter": 1}, "method.n_jitter must be >= 2 for method 'soft_teacher_j"),
        ("train", {"max_steps": 0}, "train.max_steps must be >= 1, got 0; "),
        ("train", {"eval_every": 0}, "train.eval_every must be >= 1, got 0; "),
        ("train", {"ckpt_every": -5}, "train.ckpt_every must be >= 1, got -5; "),
        ("train", {"log_every": 0}, "train.log_every must be >= 1, got 0; "),
        ("train", {"labeled_per_step": 0}, "train.labeled_per_step must be >= 1, got 0; "),
        ("train", {"unlabeled_per_step": 0}, "train.unlabeled_per_step must be >= 1, got 0; "),
        ("train", {"supervised_per_step": 0}, "train.supervised_per_step must be >= 1, got 0; "),
        ("train", {"data_actors": 0}, "train.data_actors must be >= 1, got 0; "),
        ("optim", {"lr": 0.0}, "optim.lr must be > 0, got 0.0; "),
    ],
)
def test_config_rejects_values_outside_their_range(section, changes, message):
    with pytest.raises(ValueError, match=message) as error:
        preset("smoke").replace(**{section: changes})
    assert "\n" not in str(error.value)


def test_a_supervised_step_takes_its_own_image_count_when_set():
    paper_ratio = preset("smoke").replace(
        method={"burn_in_steps": 2}, train={"max_steps": 4, "labeled_per_step": 1}
    )
    assert [paper_ratio.step_batch_sizes(s) for s in range(4)] == [(5, 0), (5, 0), (1, 4), (1, 4)]
    labeled_kept = paper_ratio.replace(train={"labeled_per_step": 5, "supervised_per_step": 5})
    assert [labeled_kept.step_batch_sizes(s) for s in range(4)] == [(5, 0), (5, 0), (5, 4), (5, 4)]
    assert labeled_kept.rows_needed(1) == (15, 8)
    baseline = labeled_kept.replace(method={"method": "supervised"})
    assert baseline.step_batch_sizes(3) == (5, 0)


def test_jitter_count_matters_only_with_jitter():
    assert MethodConfig(method="soft_teacher", n_jitter=1).n_jitter == 1
    assert MethodConfig(cls_thr=0.0, rpn_thr=1.0, reg_thr=0.0, unsup_weight=0.0).cls_thr == 0.0


# --- --set overrides ---------------------------------------------------------------------


def test_overrides_parse_by_the_field_s_type():
    cfg = apply_overrides(
        preset("smoke"),
        [
            "optim.decay_steps=1000,2000",
            "optim.lr=0.05",
            "train.max_steps=30",
            "train.num_threads=none",
            "method.ema_ramp=false",
            "method.method=e2e",
            "augment.train_sizes= 64, 96",
            "detector.backbone_weights=/w/resnet18.pth",
            "optim.grad_clip_norm=None",
            "method.unsup_weight=1",
            "method.unsup_weight=3",  # a later override of a field wins
        ],
    )
    assert cfg.optim.decay_steps == (1000, 2000) and cfg.optim.lr == 0.05
    assert cfg.train.max_steps == 30 and cfg.train.num_threads is None
    assert cfg.method.ema_ramp is False and cfg.method.method == "e2e"
    assert cfg.augment.train_sizes == (64, 96)
    assert cfg.detector.backbone_weights == "/w/resnet18.pth"
    assert cfg.optim.grad_clip_norm is None and cfg.method.unsup_weight == 3.0
    assert apply_overrides(cfg, ["optim.decay_steps="]).optim.decay_steps == ()
    assert apply_overrides(cfg, []) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cls_thr=0.8", "expected section.field=value, e.g. method.cls_thr=0.8"),
        ("method.cls_thr", "expected section.field=value"),
        ("model.cls_thr=0.8", "unknown section 'model'; known: detector, method, optim, train"),
        ("method.fg_thr=0.8", "method has no field 'fg_thr'; its fields: method, indicator, "),
        ("method.cls_thr=high", "method.cls_thr takes a number, got 'high'"),
        ("method.cls_thr=inf", "method.cls_thr takes a finite number"),
        ("train.max_steps=1.5", "train.max_steps takes a whole number, got '1.5'"),
        ("method.ema_ramp=maybe", "method.ema_ramp takes true or false"),
        ("method.indicator=bg", "method.indicator takes one of 'bg_teacher', 'bg_student'"),
        ("augment.train_sizes=64", "augment.train_sizes takes 2 comma-separated values"),
        ("optim.decay_steps=10,x", "takes comma-separated values, each a whole number"),
        ("train.max_steps=none", "train.max_steps takes a whole number, got 'none'"),
        ("method.cls_thr=1.5", r"method.cls_thr must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_overrides_are_one_line(override, message):
    with pytest.raises(ValueError, match=message) as error:
        apply_overrides(preset("smoke"), [override])
    assert "\n" not in str(error.value)


def test_sweep_overrides_come_last_and_name_the_sweep():
    plain = SweepSettings(preset="smoke", max_steps=5)
    tuned = SweepSettings(preset="smoke", max_steps=5, overrides=("train.max_steps=7",))
    assert plain.base_config().train.max_steps == 5 and tuned.base_config().train.max_steps == 7
    assert tuned.name != plain.name
    assert (
        tuned.name
        == SweepSettings(preset="smoke", max_steps=5, overrides=("train.max_steps=7",)).name
    )
    other = SweepSettings(preset="smoke", max_steps=5, overrides=("method.unsup_weight=1",))
    assert len({plain.name, tuned.name, other.name}) == 3


def test_ablation_overrides_reach_rows_and_names():
    table = TABLES["table8"]
    plain = AblationSettings(SweepSettings(preset="smoke", ratios=(10.0,), folds=(1,)))
    tuned = AblationSettings(
        SweepSettings(
            preset="smoke", ratios=(10.0,), folds=(1,), overrides=("method.reg_thr=0.05",)
        )
    )
    assert tuned.sweep_settings(table).overrides == tuned.sweep.overrides
    assert {spec.reg_thr for spec in tuned.specs(table)} == {0.05}  # the rows' default
    assert tuned.sweep_name(table) != plain.sweep_name(table)
    assert tuned.table_stem(table) != plain.table_stem(table)
    assert plain.sweep_name(table) == "ablations-table8-smoke-r10-f1"


# --- the pre-flight checks, one by one ---------------------------------------------------


def test_ratio_checks():
    check_ratios("--ratios", [0.5, 10, 100], ["supervised"])
    for ratios, message in [
        ([0], r"--ratios 0: a labeled percent must be in \(0, 100\]"),
        ([101], r"--ratios 101: a labeled percent must be in \(0, 100\]"),
        ([100], "--ratios 100 labels every image and leaves none unlabeled for multi_stage"),
    ]:
        with pytest.raises(UsageError, match=message):
            check_ratios("--ratios", ratios, ["supervised", "multi_stage"])


def test_a_ratio_must_label_at_least_one_image():
    check_labeled_count("--ratios", [1, 10], num_images=100)
    with pytest.raises(UsageError, match=r"--ratio 1: 1% of the 60 training .* at least 1.67%"):
        check_labeled_count("--ratio", [10, 1], num_images=60)
    with pytest.raises(UsageError, match="33.34%"):
        check_labeled_count("--ratio", [33.3], num_images=3)
    check_labeled_count("--ratio", [33.34], num_images=3)
    with pytest.raises(UsageError, match="the training set has no images"):
        check_labeled_count("--ratio", [10], num_images=0)


def test_fold_step_and_threshold_checks():
    check_folds("--folds", (1, 5))
    with pytest.raises(UsageError, match="--folds 0,6: the protocol's folds are 1 to 5"):
        check_folds("--folds", (0, 1, 6))
    with pytest.raises(UsageError, match="--folds: no value given"):
        check_folds("--folds", ())
    check_at_least_one("--max-steps", None)
    with pytest.raises(UsageError, match="--ckpt-every 0: must be at least 1"):
        check_at_least_one("--ckpt-every", 0)
    check_thresholds("--fg-thr", [0, 0.9, 1])
    with pytest.raises(UsageError, match=r"--var-thr 1.5: a threshold must be in \[0, 1\]"):
        check_thresholds("--var-thr", [0.02, 1.5])


def test_resource_checks():
    gpu = WorkerResources(num_workers=1, gpus_per_worker=1.0)
    check_resources(gpu, cuda_available=True, joins_cluster=False)
    check_resources(gpu, cuda_available=False, joins_cluster=True)  # the cluster may have GPUs
    check_resources(WorkerResources(num_workers=0), cuda_available=False, joins_cluster=False)
    with pytest.raises(UsageError, match="--gpus-per-worker 1: this machine has no CUDA"):
        check_resources(gpu, cuda_available=False, joins_cluster=False)
    with pytest.raises(UsageError, match="--workers -1: must be >= 0"):
        check_resources(WorkerResources(num_workers=-1), cuda_available=True, joins_cluster=True)
    with pytest.raises(UsageError, match="--cpus-per-worker 0: must be > 0"):
        check_resources(WorkerResources(cpus_per_worker=0), cuda_available=True, joins_cluster=True)


def test_an_override_that_every_trial_replaces_is_refused():
    settings = SweepSettings(preset="smoke", ratios=(10,), folds=(1,), cls_thrs=(0.5,))
    lost = dataclasses.replace(settings, overrides=("method.rpn_thr=0.3",))
    with pytest.raises(UsageError, match="--set method.rpn_thr: trial r10-f1-.* sets it to 0.5"):
        check_overrides_reach_trials(
            lost.base_config(), lost.trial_specs(), lost.overrides, "--fg-thr sets it"
        )
    kept = dataclasses.replace(settings, overrides=("method.unsup_weight=1",))
    check_overrides_reach_trials(kept.base_config(), kept.trial_specs(), kept.overrides, "")


def test_the_detector_class_count_comes_from_the_dataset(tmp_path):
    cfg = preset("smoke")  # 4 classes
    summary = CocoSummary(tmp_path / "train.json", 10, [{"id": i, "name": str(i)} for i in (1, 2)])
    assert coco_class_override(cfg, summary, ()) == "detector.num_classes=2"
    same = CocoSummary(summary.ann_file, 10, [{"id": i, "name": str(i)} for i in range(4)])
    assert coco_class_override(cfg, same, ()) is None
    with pytest.raises(UsageError, match="--set detector.num_classes=4, but .* has 2 categories"):
        coco_class_override(cfg, summary, ("detector.num_classes=4",))


# --- the CLIs: exit status 2 and one line, before any cluster ----------------------------


def _load_cli(name: str) -> ModuleType:
    path = ROOT / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clis() -> dict[str, ModuleType]:
    return {name: _load_cli(name) for name in ("fold_sweep", "ablations")}


@pytest.fixture
def run_cli(clis, monkeypatch, capsys, tmp_path):
    """``(exit status, stderr)`` of a CLI's ``main``; no cluster may start on the way."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_cluster(*args, **kwargs):
        raise AssertionError("the Ray cluster was started before the inputs were checked")

    def run(name: str, *argv: str) -> tuple[int, str]:
        module = clis[name]
        monkeypatch.setattr(module, "start_or_join", no_cluster)
        connected = ray.is_initialized()  # the suite's shared loopback cluster may be up
        with pytest.raises(SystemExit) as exit_info:
            module.main(
                [
                    "--results-dir",
                    str(tmp_path / "results"),
                    "--data-dir",
                    str(tmp_path / "data"),
                    *argv,
                ]
            )
        assert ray.is_initialized() == connected
        return exit_info.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ratios", "0"], r"error: --ratios 0: a labeled percent must be in \(0, 100\]"),
        (["--ratios", "100"], "error: --ratios 100 labels every image and leaves none"),
        (["--ratios", "1"], "error: --ratios 1: 1% of the 60 training images labels less"),
        (["--folds", "6"], "error: --folds 6: the protocol's folds are 1 to 5"),
        (["--max-steps", "0"], "error: --max-steps 0: must be at least 1 step"),
        (["--ckpt-every", "0"], "error: --ckpt-every 0: must be at least 1 step"),
        (["--workers", "-1"], "error: --workers -1: must be >= 0"),
        (["--workers", "64"], "error: --workers 64 x --cpus-per-worker 1: a trial needs 64"),
        (["--fg-thr", "1.5"], r"error: --fg-thr 1.5: a threshold must be in \[0, 1\]"),
        (["--var-thr", "-0.1"], r"error: --var-thr -0.1: a threshold must be in \[0, 1\]"),
        (["--gpus-per-worker", "1"], "error: --gpus-per-worker 1: this machine has no CUDA"),
        (["--set", "method.cls=1"], "error: --set method.cls=1: method has no field 'cls'"),
        (["--set", "optim.lr=0"], "error: optim.lr must be > 0, got 0.0"),
        (["--set", "method.method=e2e"], "error: --set method.method: trial .* sets it to"),
        (["--shared-burn-in", "--set", "method.burn_in_steps=0"], "error: a shared burn-in"),
        (["--coco-root", "/nonexistent/coco"], "error: --coco-root /nonexistent/coco: no such"),
        (["--scheduler", "asha"], "error: --scheduler asha ranks trials against each other"),
        (
            ["--scheduler", "asha", "--folds", "1", "--baseline"],
            "error: --scheduler asha would rank the supervised baseline",
        ),
        (
            ["--scheduler", "asha", "--folds", "1", "--grace-steps", "2"],
            r"error: train.eval_every \(12\) is beyond --grace-steps \(2\)",
        ),
    ],
)
def test_fold_sweep_reports_bad_input_before_the_cluster(run_cli, argv, message):
    code, err = run_cli("fold_sweep", "--preset", "smoke", "--ratios", "10", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ratio", "100"], "error: --ratio 100 labels every image and leaves none unlabeled"),
        (["--fold", "0"], "error: --fold 0: the protocol's folds are 1 to 5"),
        (["--max-steps", "0"], "error: --max-steps 0: must be at least 1 step"),
        (["--gpus-per-worker", "0.5"], "error: --gpus-per-worker 0.5: this machine has no CUDA"),
        (["--only", "table99"], r"error: unknown table\(s\) \['table99'\]"),
        (["--set", "method.n_jitter=1"], "error: method.n_jitter must be >= 2"),
        (["--set", "method.rpn_thr=0.2"], "error: --set method.rpn_thr: trial .* sets it"),
        (["--branch-from", "/nonexistent/ckpt"], "error: --branch-from: checkpoint: no "),
    ],
)
def test_ablations_report_bad_input_before_the_cluster(run_cli, argv, message):
    code, err = run_cli("ablations", "--preset", "smoke", "--only", "table6", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


def test_a_supervised_only_ablation_may_label_every_image(run_cli):
    """100% passes for the supervised row alone: what stops this run is a later check."""
    code, err = run_cli(
        "ablations",
        "--preset",
        "smoke",
        "--only",
        "table6",
        "--rows",
        "supervised",
        "--ratio",
        "100",
        "--set",
        "method.method=e2e",
    )
    assert code == 2 and "error: --set method.method: trial r100-f1-supervised" in err


def test_a_truncated_branch_point_is_named(run_cli, tmp_path):
    file = save_checkpoint(SoftTeacherTrainer(preset("smoke"), torch.device("cpu")), tmp_path)
    file.write_bytes(file.read_bytes()[:1000])
    code, err = run_cli("ablations", "--preset", "smoke", "--branch-from", str(tmp_path))
    assert code == 2 and f"error: --branch-from: {file}: unreadable" in err


def test_input_errors_of_a_started_run_are_one_line_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with preflight.exit_on_usage_error(*preflight.INPUT_ERRORS):
            raise CocoFormatError("fold.json: annotation id 1 appears twice; fix it")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: fold.json: annotation id 1 appears twice; fix it\n"
    with pytest.raises(ValueError, match="a bug"):
        with preflight.exit_on_usage_error(*preflight.INPUT_ERRORS):
            raise ValueError("a bug")


def test_help_runs_without_a_cluster(clis, capsys):
    connected = ray.is_initialized()  # the suite's shared loopback cluster may be up
    for module in clis.values():
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "--set SECTION.FIELD=VALUE" in capsys.readouterr().out
    assert ray.is_initialized() == connected


# --- --coco-root: the layout, the categories, the class count ----------------------------


def _coco(num_images: int, names: tuple[str, ...] = ("circle", "square")) -> dict:
    images = [
        {"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 40}
        for i in range(1, num_images + 1)
    ]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]}
        for i in range(1, num_images + 1)
    ]
    categories = [{"id": i, "name": name} for i, name in enumerate(names, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco_root(tmp_path: Path, val_names: tuple[str, ...] = ("circle", "square")) -> Path:
    root = tmp_path / "coco"
    for folder in ("train2017", "val2017", "annotations"):
        (root / folder).mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(_coco(50)))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(_coco(5, val_names)))
    return root


def test_a_coco_root_sets_the_detector_s_class_count(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = str(_coco_root(tmp_path))
    settings = SweepSettings(preset="smoke", ratios=(10.0,), folds=(1,), coco_root=root)
    checked = check_sweep(settings, address=None)
    assert checked.overrides == ("detector.num_classes=2",)
    assert checked.base_config().detector.num_classes == 2
    assert checked.name != settings.name
    assert capsys.readouterr().out == (
        "--coco-root: instances_train2017.json has 2 categories and the smoke preset's detector "
        "4: adding --set detector.num_classes=2\n"
    )
    ablation = preflight.check_ablations(AblationSettings(settings), [TABLES["table6"]], None)
    assert ablation.sweep.overrides == ("detector.num_classes=2",)


def _sweep_on(run_cli, root: Path, *argv: str) -> tuple[int, str]:
    return run_cli(
        "fold_sweep", "--preset", "smoke", "--ratios", "10", "--coco-root", str(root), *argv
    )


def test_a_coco_root_lacking_parts_names_them(run_cli, tmp_path):
    root = _coco_root(tmp_path)
    (root / "train2017").rmdir()
    (root / "annotations" / "instances_val2017.json").unlink()
    code, err = _sweep_on(run_cli, root)
    assert code == 2
    assert f"--coco-root {root} lacks train2017/, annotations/instances_val2017.json;" in err


def test_coco_files_whose_categories_differ_name_both(run_cli, tmp_path):
    root = _coco_root(tmp_path, val_names=("circle", "triangle"))
    code, err = _sweep_on(run_cli, root)
    assert code == 2 and err.count("\n") == 1
    assert "instances_val2017.json: categories differ from" in err
    assert "instances_train2017.json" in err and "(2, 'triangle')" in err


def test_a_class_count_that_contradicts_the_coco_root_is_refused(run_cli, tmp_path):
    code, err = _sweep_on(run_cli, _coco_root(tmp_path), "--set", "detector.num_classes=5")
    assert code == 2 and "--set detector.num_classes=5, but" in err and "has 2 categories" in err


def test_a_results_folder_under_a_file_is_refused_before_the_cluster(run_cli, tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should go")
    target = tmp_path / "taken" / "results"
    code, err = run_cli(
        "fold_sweep", "--preset", "smoke", "--ratios", "10", "--results-dir", str(target)
    )
    assert code == 2
    assert f"error: --results-dir {target}: {tmp_path / 'taken'} is a file, not a folder" in err


def test_a_disk_too_full_for_the_checkpoints_is_refused_before_the_cluster(run_cli, monkeypatch):
    """Two smoke trials keep 3 checkpoints each of 3 copies of 12.3M float32 parameters."""
    full = shutil._ntuple_diskusage(total=2**40, used=2**40 - 2**20, free=2**20)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: full)
    code, err = run_cli(
        "ablations", "--preset", "smoke", "--only", "table6", "--rows", "e2e,e2e_ema"
    )
    assert code == 2
    assert "0.0 GiB free on its disk, and the 2 trial(s) keep up to 0.8 GiB of checkpoints" in err
    assert "(3 of 140 MiB each)" in err and "--set train.keep_checkpoints=1" in err


@pytest.mark.ray
def test_a_trial_a_joined_cluster_cannot_hold_is_named_before_the_sweep_waits(ray_cluster):
    """On a joined cluster (here the tests' 4-CPU one) the sweep cannot refuse a trial that
    does not fit (an autoscaler may add nodes), so it says what is missing."""
    assert placement_warning(WorkerResources(num_workers=0, cpus_per_worker=1)) is None
    wide = placement_warning(WorkerResources(num_workers=8, cpus_per_worker=1))
    assert wide.startswith("a trial needs 8.51 CPU (the cluster has 4)")
    assert "lower --workers" in wide
    gpu = placement_warning(WorkerResources(num_workers=1, gpus_per_worker=1))
    assert gpu.startswith("a trial needs 1 GPU (the cluster has 0)")


def test_a_taken_dashboard_port_is_passed_over_unless_it_was_asked_for(capsys):
    """A second sweep beside a first: Ray's default dashboard port is taken, and Ray would
    fail on it with a traceback after starting the cluster's other processes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(UsageError, match=rf"^--dashboard-port {taken}: .* is in use"):
            choose_dashboard_port(taken)
        chosen = choose_dashboard_port(None, default=taken)
        assert chosen > taken
        assert f"127.0.0.1:{taken} is in use" in capsys.readouterr().out
    assert choose_dashboard_port(chosen) == chosen


def test_a_dashboard_port_another_command_chose_is_passed_over_until_it_exits(capsys):
    """Two sweeps started seconds apart: the first's cluster has not bound its dashboard
    yet, so its port looks free; the first command's claim on it is what the second sees."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from softteacher.preflight import choose_dashboard_port; "
         f"print(choose_dashboard_port(None, default={port}), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert first.stdout.readline().strip() == str(port)
        with pytest.raises(UsageError, match=rf"^--dashboard-port {port}: .* is in use"):
            choose_dashboard_port(port)
        assert choose_dashboard_port(None, default=port) > port
        assert f"127.0.0.1:{port} is in use" in capsys.readouterr().out
    finally:
        first.communicate("")  # the first command exits: its claim goes with it
    assert choose_dashboard_port(None, default=port) == port
