"""Checks of a sweep or ablation request that run before its Ray cluster starts.

A bad option or input file found after the cluster started costs a minute of start-up and
ends in a traceback from a Ray worker; found here it is one line, ``error: <what is wrong,
where, the fix>``, and exit status 2 (argparse's). The ``check_*`` functions are pure; the
``check_sweep`` and ``check_ablations`` request checks read the dataset's annotation files.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from softteacher.config import ExperimentConfig
from softteacher.data.coco import CocoFormatError, CocoSummary
from softteacher.data.folds import FoldError
from softteacher.data.images import CorruptImageError
from softteacher.data.protocol import DatasetLayoutError, coco_root_summary
from softteacher.data.shards import EmptyDatasetError
from softteacher.files import nearest_existing
from softteacher.model.detector import build_detector
from softteacher.run.spec import WorkerResources
from softteacher.track.stores import TrackingError
from softteacher.train.checkpoint import CheckpointError
from softteacher.tune.ablation_tables import AblationTable
from softteacher.tune.ablations import AblationSettings
from softteacher.tune.cluster import DASHBOARD_HOST, DASHBOARD_PORT
from softteacher.tune.grid import SweepSettings, TrialSpec, split_shared_burn_in
from softteacher.tune.sweep import cpus_per_trial

FOLDS = range(1, 6)  # the STAC protocol's five folds
# A checkpoint holds three float32 copies of the student's parameters: the student, the EMA
# teacher and the optimiser's momentum.
CHECKPOINT_COPIES = 3
# What a user can fix that surfaces only once the run started (a bad box in a fold file, a
# truncated checkpoint): reported as one line too, but a bug's ValueError keeps its traceback.
INPUT_ERRORS: tuple[type[Exception], ...] = (
    CocoFormatError,
    FoldError,
    DatasetLayoutError,
    CheckpointError,
    CorruptImageError,  # a bad image found while the driver prepares the folds
    EmptyDatasetError,  # a set of nothing but bad images
    TrackingError,  # an MLflow store that cannot be used as asked (deleted, moved)
)


class UsageError(ValueError):
    """A request that cannot run as given: one line saying what is wrong, where, the fix."""


@contextmanager
def exit_on_usage_error(*errors: type[Exception]) -> Iterator[None]:
    """Report ``errors`` as ``error: <message>`` on stderr and exit 2, never a traceback."""
    try:
        yield
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def joins_cluster(address: str | None) -> bool:
    """Whether ``start_or_join`` joins a running cluster rather than starting a local one."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def choose_dashboard_port(requested: int | None, default: int = DASHBOARD_PORT) -> int:
    """The local cluster's dashboard port: ``requested`` when it is free; without a request
    Ray's ``default`` or, when another cluster on the machine holds it (a second sweep
    beside a first), the next free port after it, said in one line (Ray itself fails on a
    taken port with a traceback, after the cluster's other processes started).

    A port counts as taken while another command of ours has claimed it: a cluster binds
    its dashboard some seconds after its command chose the port (over 10 s on a busy 2-core
    machine), so a second command started in that window found it free and Ray then failed
    to bind it. The claim lasts as long as this process."""
    if requested is not None:
        if not _port_is_free(requested) or not _claim(requested):
            raise UsageError(
                f"--dashboard-port {requested}: {DASHBOARD_HOST}:{requested} is in use "
                "(another Ray cluster's dashboard?); pass a free port, or leave the option "
                "out to take the next free one"
            )
        return requested
    for port in range(default, default + 100):
        if _port_is_free(port) and _claim(port):
            if port != default:
                print(
                    f"{DASHBOARD_HOST}:{default} is in use (another Ray cluster on this "
                    f"machine?): this one's dashboard listens on port {port}"
                )
            return port
    raise UsageError(
        f"ports {default}-{default + 99} are all in use; pass a free one with --dashboard-port"
    )


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((DASHBOARD_HOST, port))
        except OSError:
            return False
    return True


_CLAIMED_PORTS: dict[int, int] = {}  # port -> the open lock file's descriptor, held to exit


def _claim(port: int) -> bool:
    """Take the machine-wide lock file of ``port`` unless another live process holds it
    (the kernel drops a dead process's lock, so a killed sweep leaves no stale claim)."""
    if port in _CLAIMED_PORTS:
        return True
    lock_file = Path(tempfile.gettempdir()) / f"softteacher-dashboard-{port}.lock"
    try:
        fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        return True  # another user's lock file: the bind check alone decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMED_PORTS[port] = fd
    return True


def check_sweep(settings: SweepSettings, address: str | None) -> SweepSettings:
    """Every check of a fold sweep; returns the settings with the detector's class count
    taken from ``--coco-root``'s categories where the preset's differs."""
    _check_nonempty("--ratios", settings.ratios)
    check_folds("--folds", settings.folds)
    check_at_least_one("--max-steps", settings.max_steps)
    check_at_least_one("--ckpt-every", settings.ckpt_every)
    check_thresholds("--fg-thr", settings.cls_thrs)
    check_thresholds("--var-thr", settings.reg_thrs)
    check_resources(
        settings.resources,
        cuda_available=torch.cuda.is_available(),
        joins_cluster=joins_cluster(address),
    )
    specs = settings.trial_specs()  # builds the config: a bad --set fails here
    check_ratios("--ratios", settings.ratios, [spec.method for spec in specs])
    settings, num_images = _with_dataset_classes(settings)
    check_labeled_count("--ratios", settings.ratios, num_images)
    base, specs = settings.base_config(), settings.trial_specs()
    check_overrides_reach_trials(
        base, specs, settings.overrides, "--method, --fg-thr and --var-thr set it"
    )
    if settings.shared_burn_in:
        split_shared_burn_in(specs, base)  # a burn-in to share
    if settings.early_stopping is not None:
        settings.early_stopping.check(settings)
    check_results_folder("--results-dir", Path(settings.results_dir), base, len(specs))
    return settings


def check_ablations(
    settings: AblationSettings, tables: Sequence[AblationTable], address: str | None
) -> AblationSettings:
    """Every check of an ablation request; returns the settings as ``check_sweep`` does."""
    sweep = settings.sweep
    check_folds("--fold", sweep.folds)
    check_at_least_one("--max-steps", sweep.max_steps)
    check_resources(
        sweep.resources,
        cuda_available=torch.cuda.is_available(),
        joins_cluster=joins_cluster(address),
    )
    methods = [row.method for table in tables for row in table.rows]
    check_ratios("--ratio", sweep.ratios, methods)
    sweep, num_images = _with_dataset_classes(sweep)
    settings = dataclasses.replace(settings, sweep=sweep)
    check_labeled_count("--ratio", sweep.ratios, num_images)
    base = settings.base_config()
    specs = [spec for table in tables for spec in settings.specs(table)]
    check_overrides_reach_trials(base, specs, sweep.overrides, "each table's rows set it")
    if sweep.shared_burn_in:
        split_shared_burn_in(specs, base)  # a burn-in to share
    settings.check_branch_point()
    check_results_folder("--results-dir", Path(sweep.results_dir), base, len(specs))
    return settings


def checkpoint_bytes(cfg: ExperimentConfig) -> int:
    """A checkpoint's size, from the detector's parameter count (built on the meta device:
    no memory, no weights file read)."""
    detector_cfg = dataclasses.replace(cfg.detector, backbone_weights=None)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # the random-init warning of an R50 without weights
        detector = build_detector(detector_cfg)
    return CHECKPOINT_COPIES * 4 * sum(p.numel() for p in detector.parameters())


def check_results_folder(option: str, folder: Path, cfg: ExperimentConfig, trials: int) -> None:
    """The results folder can be made and written, and its disk holds every trial's kept
    checkpoints (``train.keep_checkpoints`` and the burn-in branch point), so that a sweep
    does not die of a full disk hours in."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(f"{option} {folder}: {existing} is a file, not a folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder}: {existing} is not writable; pass another folder")
    size = checkpoint_bytes(cfg)
    kept = cfg.train.keep_checkpoints + 1
    needed = trials * kept * size
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UsageError(
            f"{option} {folder}: {free / 2**30:.1f} GiB free on its disk, and the {trials} "
            f"trial(s) keep up to {needed / 2**30:.1f} GiB of checkpoints ({kept} of "
            f"{size / 2**20:.0f} MiB each); free some space, pass a folder on another disk, "
            "or keep fewer (--set train.keep_checkpoints=1)"
        )


def check_ratios(option: str, ratios: Iterable[float], methods: Iterable[str]) -> None:
    """Labeled percents in (0, 100]; 100 leaves no unlabeled image, which only the
    supervised method does without (multi-stage pseudo-labels them)."""
    needs_unlabeled = sorted(set(methods) - {"supervised"})
    for ratio in ratios:
        if not 0 < ratio <= 100:
            raise UsageError(
                f"{option} {ratio:g}: a labeled percent must be in (0, 100], e.g. 1, 5 or 10"
            )
        if ratio == 100 and needs_unlabeled:
            raise UsageError(
                f"{option} 100 labels every image and leaves none unlabeled for "
                f"{', '.join(needs_unlabeled)}; use a percent below 100, or only the "
                "supervised method"
            )


def check_labeled_count(option: str, ratios: Iterable[float], num_images: int) -> None:
    """A percent of the training set must be at least one image: the folds would silently
    round it up to one, which is not the ratio asked for."""
    if num_images < 1:
        raise UsageError(f"{option}: the training set has no images; give a dataset with some")
    for ratio in ratios:
        if ratio / 100 * num_images < 1:
            least = math.ceil(10_000 / num_images) / 100
            raise UsageError(
                f"{option} {ratio:g}: {ratio:g}% of the {num_images} training images labels "
                f"less than one image; use at least {least:g}% (or a larger dataset)"
            )


def check_folds(option: str, folds: Sequence[int]) -> None:
    _check_nonempty(option, folds)
    bad = [fold for fold in folds if fold not in FOLDS]
    if bad:
        raise UsageError(
            f"{option} {','.join(map(str, bad))}: the protocol's folds are 1 to 5; choose "
            "among them"
        )


def check_at_least_one(option: str, value: int | None) -> None:
    """A step count (None: the preset's)."""
    if value is not None and value < 1:
        raise UsageError(f"{option} {value}: must be at least 1 step; give a positive count")


def check_thresholds(option: str, values: Iterable[float]) -> None:
    for value in values:
        if not 0 <= value <= 1:
            raise UsageError(f"{option} {value:g}: a threshold must be in [0, 1], e.g. 0.9")


def check_resources(
    resources: WorkerResources, *, cuda_available: bool, joins_cluster: bool
) -> None:
    """Resources no trial could get would leave every trial pending for ever."""
    if resources.num_workers < 0:
        raise UsageError(
            f"--workers {resources.num_workers}: must be >= 0 (0: the trial's own process)"
        )
    if not resources.cpus_per_worker > 0:
        raise UsageError(
            f"--cpus-per-worker {resources.cpus_per_worker:g}: must be > 0; give a CPU count"
        )
    if resources.gpus_per_worker < 0:
        raise UsageError(
            f"--gpus-per-worker {resources.gpus_per_worker:g}: must be >= 0; give a GPU count"
        )
    local_cpus = os.cpu_count() or 1
    if not joins_cluster and cpus_per_trial(resources) > local_cpus:
        raise UsageError(
            f"--workers {resources.num_workers} x --cpus-per-worker "
            f"{resources.cpus_per_worker:g}: a trial needs {cpus_per_trial(resources):.2f} "
            f"CPUs (with its Tune process and data actors) and this machine has {local_cpus}, "
            "so no trial could start; lower them, or join a bigger cluster (--address)"
        )
    if resources.gpus_per_worker > 0 and not cuda_available and not joins_cluster:
        raise UsageError(
            f"--gpus-per-worker {resources.gpus_per_worker:g}: this machine has no CUDA device "
            "and no cluster is joined, so no trial could start; drop the option, or join a "
            "cluster with GPUs (--address or RAY_ADDRESS)"
        )


def placement_warning(resources: WorkerResources) -> str | None:
    """On a joined cluster: what a trial needs beyond what the cluster has now. Ray then
    keeps the trial pending until nodes join (an autoscaler's) or for ever, with the reason
    in its logs only, so the sweep says it before it waits. None when a trial fits."""
    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    per_trial = {
        "CPU": cpus_per_trial(resources),
        "GPU": resources.worker_count * resources.gpus_per_worker,
    }
    short = [
        f"{needed:g} {kind} (the cluster has {total.get(kind, 0.0):g})"
        for kind, needed in per_trial.items()
        if needed > total.get(kind, 0.0)
    ]
    biggest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    if not short and resources.cpus_per_worker > biggest:
        short.append(
            f"{resources.cpus_per_worker:g} CPU on one node for each worker (the largest node "
            f"has {biggest:g})"
        )
    if not short:
        return None
    return (
        f"a trial needs {' and '.join(short)}: the trials wait until nodes that fit join the "
        "cluster; lower --workers / --cpus-per-worker / --gpus-per-worker, or Ctrl-C"
    )


def check_overrides_reach_trials(
    base: ExperimentConfig, specs: Iterable[TrialSpec], overrides: Sequence[str], setter: str
) -> None:
    """A ``--set`` of a field that a trial sets from its grid point (``method.rpn_thr`` from
    the foreground threshold, say) would be silently lost."""
    keys = {override.partition("=")[0].strip() for override in overrides}
    before = base.flat()
    for spec in specs:
        after = spec.apply(base).flat()
        lost = sorted(key for key in keys if after[key] != before[key])
        if lost:
            raise UsageError(
                f"--set {lost[0]}: trial {spec.name} sets it to {after[lost[0]]!r}, so the "
                f"override would be lost; {setter}: change it there instead"
            )


def coco_class_override(
    cfg: ExperimentConfig, summary: CocoSummary, overrides: Sequence[str]
) -> str | None:
    """``detector.num_classes=<n>`` when the config's count is not the dataset's: the
    detector's head needs one output a category, and its labels run 1..n."""
    if cfg.detector.num_classes == summary.num_classes:
        return None
    if any(override.partition("=")[0].strip() == "detector.num_classes" for override in overrides):
        raise UsageError(
            f"--set detector.num_classes={cfg.detector.num_classes}, but {summary.ann_file} "
            f"has {summary.num_classes} categories; drop that --set (the count comes from the "
            "dataset)"
        )
    return f"detector.num_classes={summary.num_classes}"


def _with_dataset_classes(settings: SweepSettings) -> tuple[SweepSettings, int]:
    """The settings with ``coco_class_override`` added (said in one line), and the number
    of training images: the synthetic set's from the config, a COCO root's from its file."""
    base = settings.base_config()
    if not settings.coco_root:
        return settings, base.synthetic.num_train
    summary = _coco_root(settings.coco_root)
    override = coco_class_override(base, summary, settings.overrides)
    if override:
        print(
            f"--coco-root: {summary.ann_file.name} has {summary.num_classes} categories and the "
            f"{settings.preset} preset's detector {base.detector.num_classes}: adding --set "
            f"{override}"
        )
        settings = dataclasses.replace(settings, overrides=(*settings.overrides, override))
    return settings, summary.num_images


def _coco_root(coco_root: str) -> CocoSummary:
    try:
        return coco_root_summary(Path(coco_root))
    except DatasetLayoutError as error:
        raise UsageError(str(error)) from None


def _check_nonempty(option: str, values: Sequence[object]) -> None:
    if not values:
        raise UsageError(f"{option}: no value given; give at least one (comma-separated)")
