"""Prediction overlays (Figure 4): drawing, the checkpoint found through MLflow, and the
predict.py CLI end to end on a tiny saved checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softteacher.data.protocol import synthetic_folds
from softteacher.eval.inference import (
    TEACHER_FILE,
    RunArtifactError,
    boxes_to_original,
    detect,
    export_teacher,
    load_detector,
    load_logged_model,
    load_model_folder,
    run_checkpoint,
)
from softteacher.eval.overlays import (
    ClassNamesError,
    ImageFolderError,
    class_colour,
    class_names_for,
    draw_detections,
    image_files,
    overlay_artifacts,
    side_by_side,
)
from softteacher.presets import preset
from softteacher.track.datasets import DataSplit
from softteacher.track.mlflow_runs import (
    find_or_start_child_run,
    log_json_artifact,
    start_parent_run,
)
from softteacher.track.models import log_logged_model
from softteacher.train.checkpoint import save_checkpoint
from softteacher.train.trainer import SoftTeacherTrainer

ROOT = Path(__file__).resolve().parents[1]
GREY = 128


def _grey(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def test_draw_detections_outlines_confident_boxes_in_their_class_colour():
    image = _grey(400, 400)  # large enough not to be enlarged
    dets = [
        {"box": [100, 120, 300, 320], "label": "square", "score": 0.93},
        {"box": [20, 20, 60, 60], "label": "circle", "score": 0.3},
    ]
    drawn = np.asarray(draw_detections(image, dets, min_score=0.5))
    assert drawn.shape == image.shape
    assert tuple(drawn[250, 100]) == class_colour("square")  # left edge, below the caption
    assert tuple(drawn[210, 200]) == (GREY,) * 3  # inside the box: untouched
    assert (drawn[10:70, 10:70] == GREY).all()  # below min_score: not drawn
    caption = drawn[95:120, 100:160]  # the "square 0.93" label above the box
    assert (caption == class_colour("square")).all(axis=-1).mean() > 0.3
    assert (caption == 0).all(axis=-1).any()  # black text on it


def test_small_images_are_enlarged_with_their_boxes():
    drawn = draw_detections(_grey(40, 80), [{"box": [0, 10, 40, 30], "label": "x", "score": 1.0}])
    assert drawn.size == (640, 320)  # short side 40 -> 320, factor 8
    assert tuple(np.asarray(drawn)[160, 1]) == class_colour("x")  # left edge at x = 0 * 8


def test_side_by_side_puts_titles_above_each_image():
    left = Image.new("RGB", (100, 80), (255, 0, 0))
    right = Image.new("RGB", (120, 60), (0, 0, 255))
    combined = side_by_side([left, right], ["supervised", "soft teacher"], gap=8)
    pixels = np.asarray(combined)
    assert combined.width == 100 + 120 + 3 * 8
    strip = combined.height - 80 - 8
    assert tuple(pixels[strip + 10, 8 + 50]) == (255, 0, 0)
    assert tuple(pixels[strip + 10, 8 + 100 + 8 + 60]) == (0, 0, 255)
    assert (pixels[:strip, 8:108] == 0).all(axis=-1).any()  # a title in black
    with pytest.raises(ValueError, match="one title an image"):
        side_by_side([left], ["a", "b"])


def test_boxes_scale_back_axis_by_axis_and_clip():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    back = boxes_to_original(boxes, view_size=(80, 100), original_size=(40, 200))
    np.testing.assert_allclose(back, [[20, 10, 100, 30], [0, 0, 200, 40]])


def test_class_names_and_image_folder_errors(tmp_path):
    assert class_names_for(2) == {1: "class 1", 2: "class 2"}
    ann = tmp_path / "one_class.json"
    ann.write_text('{"images": [], "annotations": [], "categories": [{"id": 5, "name": "dog"}]}')
    assert class_names_for(1, ann) == {1: "dog"}
    with pytest.raises(ClassNamesError, match="1 categories but the detector has 3 classes"):
        class_names_for(3, ann)
    with pytest.raises(ImageFolderError, match="holds no image"):
        image_files(tmp_path)
    with pytest.raises(ImageFolderError, match="not a folder"):
        image_files(tmp_path / "missing")


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    fold = synthetic_folds(tmp_path_factory.mktemp("data"), preset("smoke").synthetic, [10], [1])[0]
    _, _, val = fold.load()
    return fold, val


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A saved smoke checkpoint whose teacher is confident (class 1 everywhere, few boxes a
    image) and an MLflow trial run that points to it, as a sweep trial leaves them."""
    root = tmp_path_factory.mktemp("run")
    cfg = preset("smoke").replace(detector={"detections_per_img": 3})
    trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
    predictor = trainer.teacher.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.zero_()
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[1] = 12.0
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    checkpoint_dir = root / "ray" / "checkpoint_000001"
    save_checkpoint(trainer, checkpoint_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = start_parent_run(uri, "predict-test", "sweep", params={})
    child = find_or_start_child_run(parent, "r10-f1-soft_teacher_jitter", params={})
    log_json_artifact(child, "config.json", cfg.to_dict())
    log_json_artifact(child, "summary.json", {"checkpoint": str(checkpoint_dir), "metrics": {}})
    val = DataSplit("10% fold 1 val", "abc123", root / "val.json", 20, "evaluation")
    exported = export_teacher(checkpoint_dir, cfg, root / "export")
    model_id = log_logged_model(
        child, "r10-f1-soft_teacher_jitter-cls0.7", exported,
        {"teacher/AP": 12.5, "teacher/AP50": 30.0}, trained_steps=40, evaluated_on=val,
    )
    weaker = find_or_start_child_run(parent, "r10-f1-supervised", params={})
    weaker_id = log_logged_model(
        weaker, "r10-f1-supervised", root / "export", {"teacher/AP": 3.0}, trained_steps=40
    )
    no_checkpoint = find_or_start_child_run(parent, "unfinished", params={})
    log_json_artifact(no_checkpoint, "config.json", cfg.to_dict())
    log_json_artifact(no_checkpoint, "summary.json", {"metrics": {}})
    return {"uri": uri, "run": child.run_id, "unfinished": no_checkpoint.run_id,
            "cfg": cfg, "checkpoint": checkpoint_dir, "trainer": trainer,
            "experiment_id": parent.experiment_id, "model_id": model_id, "weaker_id": weaker_id,
            "export": root / "export"}


def test_run_checkpoint_and_teacher_come_back_from_mlflow(trained_run):
    found = run_checkpoint(trained_run["uri"], trained_run["run"])
    assert found.checkpoint_dir == trained_run["checkpoint"]
    assert found.config == trained_run["cfg"]
    teacher = load_detector(found.checkpoint_dir, found.config, "teacher")
    for name, value in trained_run["trainer"].teacher.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name
    student = load_detector(found.checkpoint_dir, found.config, "student")
    assert not torch.equal(
        student.roi_heads.box_predictor.cls_score.bias,
        teacher.roi_heads.box_predictor.cls_score.bias,
    )


def test_the_best_logged_model_is_found_by_its_map_and_loads_as_the_teacher(trained_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained_run["uri"])
    found = client.search_logged_models(
        [trained_run["experiment_id"]],
        order_by=[{"field_name": "metrics.final/teacher/AP", "ascending": False}],
    )
    assert [m.model_id for m in found] == [trained_run["model_id"], trained_run["weaker_id"]]
    best = found[0]
    assert best.status == mlflow.entities.LoggedModelStatus.READY
    assert best.source_run_id == trained_run["run"]
    assert best.name == "r10-f1-soft_teacher_jitter-cls0_7"  # MLflow refuses '.' in a name
    linked = {m.key: (m.value, m.dataset_name) for m in best.metrics}
    assert linked["final/teacher/AP"] == (12.5, "10% fold 1 val")
    # the same values are the run's final metrics, and the run lists the model as its output
    run = client.get_run(trained_run["run"])
    assert run.data.metrics["final/teacher/AP"] == 12.5
    assert [o.model_id for o in run.outputs.model_outputs] == [trained_run["model_id"]]
    by_dataset = client.search_logged_models(
        [trained_run["experiment_id"]], datasets=[{"dataset_name": "10% fold 1 val"}]
    )
    assert [m.model_id for m in by_dataset] == [trained_run["model_id"]]

    teacher, cfg = load_logged_model(trained_run["uri"], f"models:/{best.model_id}")
    assert cfg == trained_run["cfg"]
    for name, value in trained_run["trainer"].teacher.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name
    # a third of the checkpoint: no student, no optimiser state
    exported = (trained_run["export"] / TEACHER_FILE).stat().st_size
    assert exported < 0.5 * (trained_run["checkpoint"] / "checkpoint.pt").stat().st_size


def test_logged_model_errors_are_one_line_with_the_fix(trained_run, tmp_path):
    with pytest.raises(RunArtifactError, match="check --model and --tracking-uri"):
        load_logged_model(trained_run["uri"], "models:/m-0000")
    with pytest.raises(RunArtifactError, match="not a logged model.s URI"):
        load_logged_model(trained_run["uri"], "runs:/abc/model")
    with pytest.raises(RunArtifactError, match="teacher.pt not found"):
        load_model_folder(tmp_path)
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "config.json").write_bytes((trained_run["export"] / "config.json").read_bytes())
    (folder / TEACHER_FILE).write_bytes((trained_run["export"] / TEACHER_FILE).read_bytes()[:500])
    with pytest.raises(RunArtifactError, match="truncated or not a teacher export"):
        load_model_folder(folder)


def test_run_errors_are_one_line_with_the_fix(trained_run, tmp_path):
    with pytest.raises(RunArtifactError, match="names no checkpoint"):
        run_checkpoint(trained_run["uri"], trained_run["unfinished"])
    with pytest.raises(RunArtifactError, match="check --run and --tracking-uri"):
        run_checkpoint(trained_run["uri"], "0" * 32)
    with pytest.raises(RunArtifactError, match="pass --checkpoint DIR"):
        load_detector(tmp_path, trained_run["cfg"])
    other = trained_run["cfg"].replace(detector={"box_head_dim": 128})
    with pytest.raises(RunArtifactError, match="do not fit the config's detector"):
        load_detector(trained_run["checkpoint"], other)


def test_detections_come_back_in_original_pixels(trained_run):
    teacher = load_detector(trained_run["checkpoint"], trained_run["cfg"]).train()
    images = [np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)]
    found = detect(teacher, images, trained_run["cfg"].augment)
    assert teacher.training  # mode restored
    assert 0 < len(found[0].boxes) <= 3 and (found[0].labels == 1).all()
    assert (found[0].boxes[:, [2, 3]] <= [70, 90]).all() and (found[0].scores > 0.99).all()


def test_overlay_artifacts_draw_the_first_val_images(trained_run, smoke_data, tmp_path):
    _, val = smoke_data
    teacher = load_detector(trained_run["checkpoint"], trained_run["cfg"])
    paths = overlay_artifacts(teacher, val, trained_run["cfg"].augment, tmp_path / "overlays", n=2)
    assert [p.name for p in paths] == [f"{Path(r.file_name).stem}.png" for r in val.records[:2]]
    for path, record in zip(paths, val.records, strict=False):
        with Image.open(path) as image:
            assert min(image.size) == 320 and image.width / image.height == pytest.approx(
                record.width / record.height, rel=0.02
            )


def test_predict_cli_writes_overlays(trained_run, smoke_data, tmp_path, capsys):
    fold, _ = smoke_data
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000001.jpg", "000002.jpg"):
        (images / name).write_bytes((fold.val_images / name).read_bytes())
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "platform"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "predict.py"), "--run", trained_run["run"],
         "--images", str(images), "--out", str(out), "--tracking-uri", trained_run["uri"],
         "--ann", str(fold.val_ann)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "2 overlays of the teacher" in done.stdout
    by_model = tmp_path / "by_model"
    sys.path.insert(0, str(ROOT / "experiments"))  # the logged model through main(), in process
    try:
        import predict

        code = predict.main(
            ["--model", f"models:/{trained_run['model_id']}", "--images", str(images),
             "--out", str(by_model), "--tracking-uri", trained_run["uri"],
             "--ann", str(fold.val_ann)]
        )  # fmt: skip
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    assert code == 0
    assert f"2 overlays of model models:/{trained_run['model_id']}" in capsys.readouterr().out
    for name in ("000001.png", "000002.png"):  # the logged teacher draws what the run's does
        assert (by_model / name).read_bytes() == (out / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000002.png"]
    for path in out.iterdir():
        assert path.stat().st_size > 1024
        with Image.open(path) as image:
            image.verify()
    with Image.open(out / "000001.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    # the confident teacher's class 1 boxes are drawn in its category's colour
    colour = class_colour(class_names_for(4, fold.val_ann)[1])
    assert (pixels == colour).all(axis=-1).sum() > 100


def test_predict_cli_reports_a_bad_class_file_in_one_line(trained_run, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import predict
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    ann = tmp_path / "two_classes.json"
    ann.write_text('{"images": [], "annotations": [], "categories": '
                   '[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}')
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_grey(50, 60)).save(images / "a.png")
    code = predict.main(["--run", trained_run["run"], "--images", str(images),
                         "--out", str(tmp_path / "out"), "--tracking-uri", trained_run["uri"],
                         "--ann", str(ann)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "2 categories but the detector has 4 classes" in err
