"""A trained detector outside training: find a run's checkpoint or logged model, rebuild it,
run it on arrays.

The detector never resizes by itself, so inference here is the evaluation's own: the test
resize (``resize_for_test``), then boxes scaled back to the original pixels axis by axis.
The pseudo-label measurement (``pseudo_quality``) and the overlays share these helpers so
that both see the images exactly as the COCO evaluation does.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN

from softteacher.config import AugmentConfig, ExperimentConfig
from softteacher.data.collate import image_tensor
from softteacher.data.transforms import resize_for_test
from softteacher.files import atomic_open
from softteacher.model.detector import build_detector
from softteacher.train.checkpoint import CHECKPOINT_FILE, read_checkpoint

ModelChoice = Literal["teacher", "student"]
SUMMARY_ARTIFACT = "summary.json"
CONFIG_ARTIFACT = "config.json"
# An exported model folder (an MLflow LoggedModel's artifacts): the teacher's weights alone
# and the config that rebuilds its detector.
TEACHER_FILE = "teacher.pt"


class RunArtifactError(FileNotFoundError):
    """A run whose checkpoint or config cannot be found from its MLflow artifacts."""


@dataclass(frozen=True)
class Detections:
    """One image's detections in its original pixels: xyxy boxes, labels 1..K, scores."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class RunCheckpoint:
    """Where a finished trial's final checkpoint lies, and the config it was trained with."""

    checkpoint_dir: Path
    config: ExperimentConfig


def device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def prepare_input(image: np.ndarray, cfg: AugmentConfig, device: torch.device) -> Tensor:
    """The CHW float test view of an HWC uint8 image, on ``device``."""
    view, _ = resize_for_test(image, cfg)
    return image_tensor(view, device)


def boxes_to_original(
    boxes: Tensor, view_size: tuple[int, int], original_size: tuple[int, int]
) -> np.ndarray:
    """(N,4) xyxy boxes of a test view (``view_size`` = (h, w)) in the original image's
    pixels (``original_size`` = (h, w)), clipped to it.

    Each axis by its own size ratio, as the COCO evaluation does: the single scale that
    ``resize_for_test`` returns is off by up to half a pixel on the rounded side.
    """
    view_height, view_width = view_size
    height, width = original_size
    factors = np.array([width / view_width, height / view_height] * 2)
    out = boxes.detach().to("cpu", torch.float64).numpy().reshape(-1, 4) * factors
    out[:, 0::2] = out[:, 0::2].clip(0.0, width)
    out[:, 1::2] = out[:, 1::2].clip(0.0, height)
    return out


@torch.no_grad()
def detect(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    cfg: AugmentConfig,
    *,
    batch_size: int = 4,
) -> list[Detections]:
    """The model's detections on HWC uint8 images, in each image's own pixels.

    The model's train/eval mode is restored afterwards, so this is safe mid-training.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = device_of(model)
    was_training = model.training
    model.eval()
    results: list[Detections] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            inputs = [prepare_input(image, cfg, device) for image in chunk]
            for image, view, output in zip(chunk, inputs, model(inputs), strict=True):
                results.append(
                    Detections(
                        boxes=boxes_to_original(output["boxes"], view.shape[1:], image.shape[:2]),
                        labels=output["labels"].cpu().numpy().astype(np.int64),
                        scores=output["scores"].cpu().numpy().astype(np.float64),
                    )
                )
    finally:
        model.train(was_training)
    return results


def load_detector(
    checkpoint_dir: Path,
    cfg: ExperimentConfig,
    which: ModelChoice = "teacher",
    device: torch.device | None = None,
) -> FasterRCNN:
    """The run's ``teacher`` (default: MMDetection 3 reports it) or ``student``, in eval mode.

    The detector is rebuilt without the config's backbone weights file: every weight comes
    from the checkpoint, and that file need not exist on the machine that predicts.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}; choose 'teacher' or 'student'")
    file = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not file.is_file():
        raise RunArtifactError(
            f"{file} not found; give the Ray checkpoint directory that holds {CHECKPOINT_FILE} "
            "(the results folder may have moved: pass --checkpoint DIR)"
        )
    device = device or torch.device("cpu")
    state = read_checkpoint(file.parent, device)
    return _detector_with(state[which], cfg, f"{file}: the {which} weights", device)


def export_teacher(checkpoint_dir: Path, cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Write the checkpoint's teacher and ``cfg`` to ``out_dir`` (``teacher.pt``,
    ``config.json``): a model to keep without the student, optimiser and data position that
    make up most of a checkpoint."""
    state = read_checkpoint(Path(checkpoint_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / TEACHER_FILE) as handle:
        torch.save({"teacher": state["teacher"]}, handle)
    config_text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    (out_dir / CONFIG_ARTIFACT).write_text(config_text)
    return out_dir


def load_model_folder(
    folder: Path, device: torch.device | None = None
) -> tuple[FasterRCNN, ExperimentConfig]:
    """The teacher and config that ``export_teacher`` wrote to ``folder``, in eval mode."""
    file, config_file = Path(folder) / TEACHER_FILE, Path(folder) / CONFIG_ARTIFACT
    for needed in (file, config_file):
        if not needed.is_file():
            raise RunArtifactError(
                f"{needed} not found; a model folder holds {TEACHER_FILE} and "
                f"{CONFIG_ARTIFACT} (a sweep trial's logged model)"
            )
    cfg = _config_from(json.loads(config_file.read_text()), str(config_file))
    device = device or torch.device("cpu")
    try:
        weights = torch.load(file, map_location=device, weights_only=True)["teacher"]
    except (RuntimeError, EOFError, KeyError, TypeError, OSError) as error:
        raise RunArtifactError(
            f"{file}: unreadable ({type(error).__name__}), the file is truncated or not a "
            "teacher export; log the model again from the run's checkpoint"
        ) from None
    return _detector_with(weights, cfg, f"{file}: the teacher weights", device), cfg


def load_logged_model(
    tracking_uri: str, model_uri: str, device: torch.device | None = None
) -> tuple[FasterRCNN, ExperimentConfig]:
    """A sweep trial's logged teacher by its MLflow model URI, ``models:/m-<id>``,
    downloaded from ``tracking_uri``'s store and rebuilt.

    The model is looked up here rather than by ``download_artifacts("models:/...")``, which
    resolves a model id against MLflow's global tracking URI, not the one it is given.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    model_id = model_uri.removeprefix("models:/").strip("/")
    if not model_uri.startswith("models:/") or not model_id or "/" in model_id:
        raise RunArtifactError(
            f"model {model_uri!r} is not a logged model's URI; give models:/m-<id> "
            "(mlflow.search_logged_models lists a sweep's models)"
        )
    with tempfile.TemporaryDirectory(prefix="softteacher-model-") as tmp:
        try:
            location = MlflowClient(tracking_uri).get_logged_model(model_id).artifact_location
            local = download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri
            )
        except (MlflowException, OSError) as error:
            raise RunArtifactError(
                f"model {model_uri} in {tracking_uri}: cannot download it ({_first_line(error)}); "
                "check --model and --tracking-uri (mlflow.search_logged_models lists them)"
            ) from None
        return load_model_folder(Path(local), device)


def _detector_with(
    weights: dict, cfg: ExperimentConfig, what: str, device: torch.device
) -> FasterRCNN:
    """``cfg``'s detector holding ``weights``, without reading its backbone weights file."""
    with warnings.catch_warnings():
        # r50-fpn warns about random init when it has no backbone file; the weights fill it.
        warnings.simplefilter("ignore", UserWarning)
        model = build_detector(dataclasses.replace(cfg.detector, backbone_weights=None))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise RunArtifactError(
            f"{what} do not fit the config's detector ({lines[-1][:200]}); "
            "pass the config.json of the run that wrote them"
        ) from None
    return model.to(device).eval()


def run_checkpoint(tracking_uri: str, run_id: str) -> RunCheckpoint:
    """The final checkpoint directory (``summary.json``'s ``checkpoint``) and the config
    (``config.json``) that a sweep trial logged as artifacts of its MLflow run."""
    summary = _json_artifact(tracking_uri, run_id, SUMMARY_ARTIFACT)
    config = _json_artifact(tracking_uri, run_id, CONFIG_ARTIFACT)
    if not summary.get("checkpoint"):
        raise RunArtifactError(
            f"run {run_id}: {SUMMARY_ARTIFACT} names no checkpoint (the trial ended before its "
            "first one); rerun the trial with a smaller train.ckpt_every"
        )
    cfg = _config_from(config, f"run {run_id}: {CONFIG_ARTIFACT}")
    return RunCheckpoint(Path(summary["checkpoint"]), cfg)


def _config_from(payload: dict, where: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_dict(payload)
    except (KeyError, TypeError) as error:
        raise RunArtifactError(
            f"{where} is not an ExperimentConfig ({error}); "
            "was it written by this version of softteacher?"
        ) from None


def _json_artifact(tracking_uri: str, run_id: str, name: str) -> dict:
    """One JSON artifact of a run, downloaded to a temporary folder and parsed."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="softteacher-run-") as tmp:
        try:
            local = download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=tracking_uri
            )
        except (MlflowException, OSError) as error:
            raise RunArtifactError(
                f"run {run_id} in {tracking_uri}: cannot read artifact {name} "
                f"({_first_line(error)}); check --run and --tracking-uri (sweep trials log "
                "it as they start and end)"
            ) from None
        return json.loads(Path(local).read_text())


def _first_line(error: Exception) -> str:
    """An MLflow or OS error as it fits in a one-line message."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__
