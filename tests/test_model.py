"""The method's pieces on a real slim detector: EMA, views, pseudo targets, one step."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops import MultiScaleRoIAlign

from softteacher.config import METHODS, MethodConfig
from softteacher.data.collate import DetectionBatch, UnlabeledBatch
from softteacher.kernels import box_jitter_variance, jitter_boxes
from softteacher.model import pseudo_labels
from softteacher.model.detector import build_detector
from softteacher.model.ema import ema_momentum, ema_update, make_teacher
from softteacher.model.pseudo_labels import (
    PseudoTargets,
    TeacherView,
    jitter_variances,
    pseudo_targets,
    teacher_background_prob,
)
from softteacher.model.soft_teacher import (
    SUPERVISED_LOSSES,
    UNSUPERVISED_LOSSES,
    StudentLosses,
    rpn_ignoring_uncertain,
    running_stats_frozen,
)
from softteacher.names import STEP_PARTS
from softteacher.presets import preset
from softteacher.train.loop import LoopHooks, fit
from softteacher.train.step_profile import profile_steps
from softteacher.train.trainer import NonFiniteLossError, SoftTeacherTrainer

SIZE = 64


def _smoke(**method_changes):
    cfg = preset("smoke")
    return cfg.replace(method=method_changes) if method_changes else cfg


def _labeled(value: float, n: int = 1) -> DetectionBatch:
    return DetectionBatch(
        images=[torch.full((3, SIZE, SIZE), value) for _ in range(n)],
        targets=[
            {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
            for _ in range(n)
        ],
    )


def _unlabeled(weak_value: float, strong_value: float, n: int = 4) -> UnlabeledBatch:
    eye = torch.eye(3).expand(n, 3, 3).clone()
    return UnlabeledBatch(
        weak=[torch.full((3, SIZE, SIZE), weak_value) for _ in range(n)],
        strong=[torch.full((3, SIZE, SIZE), strong_value) for _ in range(n)],
        weak_matrices=eye,
        strong_matrices=eye.clone(),
        image_ids=list(range(n)),
    )


def test_ema_update_follows_the_formula_and_copies_buffers():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(5.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 5.0))


def test_teacher_gets_no_gradients():
    cfg = _smoke(burn_in_steps=0)
    trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
    trainer.step(_labeled(0.5), _unlabeled(0.2, 0.8))
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    assert not trainer.teacher.training
    assert any(p.grad is not None for p in trainer.student.parameters())


def test_ema_momentum_ramp_and_methods():
    cfg = MethodConfig(ema_momentum=0.999, burn_in_steps=10)
    assert ema_momentum(3, cfg) == 0.0  # burn-in: the teacher is the student
    assert ema_momentum(10, cfg) == 0.0  # the first step after burn-in copies
    assert ema_momentum(11, cfg) == pytest.approx(0.5)
    assert ema_momentum(100_000, cfg) == pytest.approx(0.999)
    assert ema_momentum(100_000, dataclasses.replace(cfg, method="e2e")) == 0.0


def test_weak_view_goes_to_teacher_and_strong_view_to_student():
    trainer = SoftTeacherTrainer(_smoke(burn_in_steps=0), torch.device("cpu"))
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0].detach().clone())

        return hook

    trainer.teacher.backbone.register_forward_hook(record("teacher"))
    trainer.student.backbone.register_forward_hook(record("student"))
    trainer.step(_labeled(0.5), _unlabeled(weak_value=0.2, strong_value=0.8))

    def normalised(value):  # what the detector's transform makes of a constant image
        mean = torch.tensor([0.485, 0.456, 0.406])
        std = torch.tensor([0.229, 0.224, 0.225])
        return ((value - mean) / std).view(1, 3, 1, 1)

    teacher_in, student_in = seen["teacher"], seen["student"]
    assert teacher_in.shape[0] == 4 and student_in.shape[0] == 5
    torch.testing.assert_close(teacher_in, normalised(0.2).expand_as(teacher_in))
    torch.testing.assert_close(student_in[:1], normalised(0.5).expand(1, 3, SIZE, SIZE))
    torch.testing.assert_close(student_in[1:], normalised(0.8).expand(4, 3, SIZE, SIZE))


def test_pseudo_targets_split_by_score_and_variance():
    cfg = MethodConfig(cls_thr=0.9, rpn_thr=0.9, reg_thr=0.02)
    boxes = torch.tensor([[0, 0, 20, 20], [30, 30, 50, 50], [5, 30, 25, 50.0]])
    view = TeacherView(
        features={},
        image_sizes=[(SIZE, SIZE)],
        boxes=[boxes],
        labels=[torch.tensor([1, 2, 3])],
        scores=[torch.tensor([0.95, 0.6, 0.92])],
        variances=[torch.tensor([0.01, 0.005, 0.08])],
    )
    batch = _unlabeled(0.0, 0.0, n=1)
    flip = torch.tensor([[-1.0, 0, SIZE], [0, 1, 0], [0, 0, 1]])
    batch.strong_matrices = flip.unsqueeze(0)
    targets = pseudo_targets(view, batch, cfg)
    assert targets.cls[0]["labels"].tolist() == [1, 3]  # scores above cls_thr
    assert targets.rpn[0]["labels"].tolist() == [1, 1]  # class-agnostic
    # the regression boxes keep low variance (any score > 0.5) and drop the high one
    assert targets.reg[0]["labels"].tolist() == [1, 2]
    # mapped into the (flipped) strong view
    torch.testing.assert_close(targets.cls[0]["boxes"][0], torch.tensor([44.0, 0, 64, 20]))
    no_jitter = pseudo_targets(view, batch, dataclasses.replace(cfg, method="soft_teacher"))
    assert no_jitter.reg is no_jitter.cls


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_finite_step(method):
    """multi_stage's steps are supervised ones (its stages are whole supervised runs)."""
    trainer = SoftTeacherTrainer(_smoke(method=method, burn_in_steps=0), torch.device("cpu"))
    supervised = method in ("supervised", "multi_stage")
    unlabeled = None if supervised else _unlabeled(0.3, 0.7)
    metrics = trainer.step(_labeled(0.5, n=5 if supervised else 1), unlabeled)
    assert np.isfinite(metrics["loss/total"])
    assert ("loss/unsup_cls" in metrics) == (not supervised)
    assert trainer.step_count == 1


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_skips_the_step_and_is_counted(monkeypatch):
    trainer = SoftTeacherTrainer(_smoke(), torch.device("cpu"))
    student, teacher = _weights(trainer.student), _weights(trainer.teacher)
    forward = trainer.losses.forward
    poisoned = {0}  # the first step's loss becomes NaN

    def losses(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step_count in poisoned:
            out["sup_rpn_box"] = out["sup_rpn_box"] * float("nan")
        return out

    monkeypatch.setattr(trainer.losses, "forward", losses)
    metrics = trainer.step(_labeled(0.5), None)
    assert trainer.step_count == 1 and metrics["nonfinite_steps"] == 1
    assert _same(student, _weights(trainer.student)) and _same(teacher, _weights(trainer.teacher))
    assert all(p.grad is None for p in trainer.student.parameters())

    metrics = trainer.step(_labeled(0.5), None)  # a finite step trains again
    assert metrics["nonfinite_steps"] == 1 and not _same(student, _weights(trainer.student))
    assert trainer.state_dict()["nonfinite_steps"] == 1


def test_a_non_finite_gradient_of_a_finite_loss_is_skipped_too():
    trainer = SoftTeacherTrainer(_smoke(), torch.device("cpu"))
    weight = trainer.student.roi_heads.box_predictor.cls_score.weight
    weight.register_hook(lambda grad: grad * float("inf"))
    before = _weights(trainer.student)
    metrics = trainer.step(_labeled(0.5), None)
    assert np.isfinite(metrics["loss/total"]) and metrics["nonfinite_steps"] == 1
    assert _same(before, _weights(trainer.student))


def test_non_finite_steps_in_a_row_stop_the_run_with_the_step_and_the_fix():
    cfg = _smoke().replace(train={"max_nonfinite_in_a_row": 2})
    trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
    with torch.no_grad():
        trainer.student.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    trainer.step(_labeled(0.5), None)  # the first is skipped
    with pytest.raises(NonFiniteLossError, match=r"step 1, 2 step\(s\) in a row.*optim\.lr"):
        trainer.step(_labeled(0.5), None)


def test_slim_blocks_set_the_resnet_depth_and_resnet18_is_torchvisions():
    """(2, 2, 2, 2) is torchvision's ResNet-18 key for key; (1, 1, 1, 1) keeps its widths."""
    default = preset("smoke").detector
    body = build_detector(dataclasses.replace(default, slim_blocks=(2, 2, 2, 2))).backbone.body
    assert set(body.state_dict()) == {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    shallow = build_detector(dataclasses.replace(default, slim_blocks=(1, 1, 1, 1)))
    assert [len(getattr(shallow.backbone.body, f"layer{i}")) for i in range(1, 5)] == [1] * 4
    assert shallow.backbone.body.layer4[0].conv1.out_channels == 512
    with pytest.raises(ValueError, match=r"slim_blocks.*\(2, 2, 2, 2\)"):
        dataclasses.replace(default, slim_blocks=(2, 0, 2, 2))


def test_amp_runs_the_backbone_in_bf16_and_the_heads_losses_and_boxes_in_fp32():
    cfg = preset("smoke")
    amp = cfg.replace(detector={"amp": "bf16"})
    trainer = SoftTeacherTrainer(amp, torch.device("cpu"))
    dtypes = {}

    def record(name, output):
        dtypes.setdefault(name, output.dtype)  # and return None: the output stays

    body, rpn = trainer.student.backbone.body, trainer.student.rpn.head
    body.layer1.register_forward_hook(lambda m, i, out: record("layer1", out))
    rpn.register_forward_hook(lambda m, i, out: record("rpn", out[1][0]))
    metrics = trainer.step(_labeled(0.5, n=2), None)
    assert dtypes == {"layer1": torch.bfloat16, "rpn": torch.float32}
    assert np.isfinite(metrics["loss/total"])
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    # the same parameters and keys: a checkpoint of either precision loads into the other
    plain = build_detector(cfg.detector)
    plain.load_state_dict(trainer.student.state_dict())
    with torch.no_grad():
        (boxes,) = trainer.teacher.eval()([torch.rand(3, SIZE, SIZE)])
    assert boxes["boxes"].dtype == torch.float32
    with pytest.raises(ValueError, match="detector.amp 'fp8'"):
        dataclasses.replace(cfg.detector, amp="fp8")


def test_slim_detector_output_shapes():
    cfg = preset("smoke").detector
    detector = build_detector(cfg).eval()
    with torch.no_grad():
        (out,) = detector([torch.rand(3, 80, 96)])
    assert set(out) == {"boxes", "labels", "scores"}
    n = len(out["scores"])
    assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
    assert n <= cfg.detections_per_img
    if n:
        assert ((out["labels"] >= 1) & (out["labels"] <= cfg.num_classes)).all()
        assert (out["boxes"][:, 2:] <= torch.tensor([96.0, 80.0])).all()


def _confident_teacher_trainer(**method_changes) -> SoftTeacherTrainer:
    """A teacher whose ROI head calls everything class 1 with score ~1 and regresses nothing:
    the refined jittered boxes then spread exactly as the jitter does."""
    trainer = SoftTeacherTrainer(_smoke(burn_in_steps=0, **method_changes), torch.device("cpu"))
    predictor = trainer.teacher.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.zero_()
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[1] = 12.0
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    return trainer


def test_jitter_filter_removes_unstable_boxes_in_a_full_step():
    # jitter std 0.06 of the side -> sigma_bar ~ 0.06 (down to ~0.03 for small boxes at the
    # border, whose refined copies are clipped to the image): above reg_thr 0.01, below 0.2
    strict = _confident_teacher_trainer(reg_thr=0.01, n_jitter=10, cls_thr=0.5, rpn_thr=0.5)
    metrics = strict.step(_labeled(0.5), _unlabeled(0.3, 0.7))
    assert metrics["pseudo/candidates_per_image"] > 0
    assert metrics["pseudo/cls_per_image"] > 0
    assert metrics["pseudo/reg_per_image"] == 0
    lenient = _confident_teacher_trainer(reg_thr=0.2, n_jitter=10, cls_thr=0.5, rpn_thr=0.5)
    metrics = lenient.step(_labeled(0.5), _unlabeled(0.3, 0.7))
    assert metrics["pseudo/reg_per_image"] == pytest.approx(metrics["pseudo/candidates_per_image"])
    assert np.isfinite(metrics["loss/unsup_reg"])


class _RecordingSource:
    """A step source that hands out constant batches and records what each step asked for."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    def labeled(self, images: int) -> DetectionBatch:
        self.requests.append(("labeled", images))
        return _labeled(0.5, images)

    def unlabeled(self, images: int) -> UnlabeledBatch:
        self.requests.append(("unlabeled", images))
        return _unlabeled(0.5, 0.5, images)


def test_burn_in_steps_read_a_supervised_batch_and_no_unlabeled_images():
    """Burn-in is the baseline's own step (5 labeled images); then 1 labeled + 4 unlabeled."""
    cfg = preset("smoke").replace(
        method={"method": "soft_teacher", "burn_in_steps": 2},
        train={"max_steps": 4, "eval_every": 100, "ckpt_every": 100, "log_every": 100},
    )
    source = _RecordingSource()
    trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
    hooks = LoopHooks(log=lambda step, m: None, evaluate=lambda t: {}, checkpoint=lambda t, m: None)
    fit(trainer, source, hooks)

    assert source.requests == [
        ("labeled", 5),
        ("labeled", 5),
        ("labeled", 1),
        ("unlabeled", 4),
        ("labeled", 1),
        ("unlabeled", 4),
    ]
    assert trainer.step_count == 4


def test_uncertain_candidates_are_kept_apart_only_when_asked():
    view = TeacherView(
        features={},
        image_sizes=[(SIZE, SIZE)],
        boxes=[torch.tensor([[0, 0, 20, 20], [30, 30, 50, 50.0]])],
        labels=[torch.tensor([1, 2])],
        scores=[torch.tensor([0.95, 0.6])],
        variances=[torch.zeros(2)],
    )
    batch = _unlabeled(0.0, 0.0, n=1)
    paper = pseudo_targets(view, batch, MethodConfig(cls_thr=0.9, rpn_thr=0.9))
    assert len(paper.rpn_uncertain[0]) == 0 and len(paper.cls_uncertain[0]) == 0
    ignoring = MethodConfig(cls_thr=0.9, rpn_thr=0.9, ignore_uncertain=True)
    ours = pseudo_targets(view, batch, ignoring)
    torch.testing.assert_close(ours.cls_uncertain[0], torch.tensor([[30.0, 30, 50, 50]]))
    torch.testing.assert_close(ours.rpn_uncertain[0], torch.tensor([[30.0, 30, 50, 50]]))
    assert ours.cls[0]["labels"].tolist() == [1]


def test_rpn_uncertain_set_follows_rpn_thr():
    """Scores 0.95, 0.85, 0.6 with rpn_thr 0.8 < cls_thr 0.9: the 0.85 box is an RPN target
    but uncertain for classification; only the 0.6 box is uncertain for the RPN."""
    boxes = torch.tensor([[0, 0, 20, 20], [30, 30, 50, 50], [5, 40, 25, 60.0]])
    view = TeacherView(
        features={},
        image_sizes=[(SIZE, SIZE)],
        boxes=[boxes],
        labels=[torch.tensor([1, 2, 3])],
        scores=[torch.tensor([0.95, 0.85, 0.6])],
        variances=[torch.zeros(3)],
    )
    cfg = MethodConfig(cls_thr=0.9, rpn_thr=0.8, ignore_uncertain=True)
    targets = pseudo_targets(view, _unlabeled(0.0, 0.0, n=1), cfg)
    torch.testing.assert_close(targets.rpn[0]["boxes"], boxes[:2])
    torch.testing.assert_close(targets.rpn_uncertain[0], boxes[2:])
    torch.testing.assert_close(targets.cls[0]["boxes"], boxes[:1])
    torch.testing.assert_close(targets.cls_uncertain[0], boxes[1:])
    assert targets.counts_per_image()["pseudo/rpn_uncertain_per_image"] == 1
    assert targets.counts_per_image()["pseudo/cls_uncertain_per_image"] == 2


def _pseudo(cls_boxes: torch.Tensor, rpn_uncertain: torch.Tensor, cls_uncertain: torch.Tensor):
    cls = [{"boxes": cls_boxes, "labels": torch.ones(len(cls_boxes), dtype=torch.int64)}]
    return PseudoTargets(
        rpn=cls, cls=cls, reg=cls, rpn_uncertain=[rpn_uncertain], cls_uncertain=[cls_uncertain]
    )


def test_boxes_on_an_uncertain_candidate_get_no_background_weight():
    losses = StudentLosses(build_detector(preset("smoke").detector), MethodConfig(indicator="iou"))
    uncertain = torch.tensor([[30.0, 30, 50, 50]])
    pseudo = _pseudo(torch.tensor([[0.0, 0, 20, 20]]), torch.zeros(0, 4), uncertain)
    proposals = [torch.tensor([[31.0, 31, 50, 50], [2.0, 2, 20, 20], [0.0, 40, 10, 60]])]
    reliability = losses.reliability(torch.zeros(3, 5), proposals, pseudo, teacher_bg=None)
    assert reliability[0] == 0  # on the uncertain box: ignored
    assert reliability[1] > 0.8 and reliability[2] == 0  # the IoU indicator itself


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers() if "running" in name}


def _student_step(student_forward: str, with_strong: bool):
    """One student forward of a fresh smoke detector from seed 0: its losses and afterwards
    its BatchNorm running statistics."""
    torch.manual_seed(0)
    detector = build_detector(preset("smoke").detector).train()
    cfg = MethodConfig(indicator="iou", student_forward=student_forward)
    losses = StudentLosses(detector, cfg)
    labeled = _labeled(0.8, n=2)
    views = torch.Generator().manual_seed(1)  # leaves the global stream to the sampling
    strong = [torch.rand(3, SIZE, SIZE, generator=views) for _ in range(2)] if with_strong else None
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    cls = [{"boxes": box, "labels": torch.tensor([1])} for _ in range(2)]
    empty = [torch.zeros(0, 4)] * 2
    pseudo = PseudoTargets(rpn=cls, cls=cls, reg=cls, rpn_uncertain=empty, cls_uncertain=empty)
    out = losses(labeled.images, labeled.targets, strong, pseudo if with_strong else None)
    return out, _bn_buffers(detector)


def test_separate_student_forward_leaves_running_statistics_to_the_labeled_images():
    supervised, labeled_only = _student_step("joint", with_strong=False)
    separate, separate_stats = _student_step("separate", with_strong=True)
    joint, joint_stats = _student_step("joint", with_strong=True)
    assert labeled_only
    assert all(torch.equal(labeled_only[k], separate_stats[k]) for k in labeled_only)
    assert not all(torch.equal(labeled_only[k], joint_stats[k]) for k in labeled_only)
    # the labeled images are normalised by their own batch, as without strong views
    for name in SUPERVISED_LOSSES:
        assert torch.equal(separate[name], supervised[name]), name
    assert all(torch.isfinite(separate[name]) for name in UNSUPERVISED_LOSSES)
    assert not torch.equal(joint["sup_cls"], supervised["sup_cls"])


def test_running_stats_frozen_restores_tracking():
    detector = build_detector(preset("smoke").detector).train()
    before = _bn_buffers(detector)
    with running_stats_frozen(detector.backbone):
        detector.backbone(torch.rand(2, 3, SIZE, SIZE))
    after = _bn_buffers(detector)
    assert all(torch.equal(before[k], after[k]) for k in before)
    norms = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)


def test_background_weights_read_the_classification_uncertain_set_only():
    detector = build_detector(preset("smoke").detector)
    losses = StudentLosses(detector, MethodConfig(indicator="none"))  # every weight 1
    uncertain = torch.tensor([[30.0, 30, 50, 50]])
    proposals = [torch.tensor([[31.0, 31, 50, 50], [0.0, 40, 10, 60]])]
    cls_box = torch.tensor([[0.0, 0, 20, 20]])
    rpn_only = _pseudo(cls_box, rpn_uncertain=uncertain, cls_uncertain=torch.zeros(0, 4))
    reliability = losses.reliability(torch.zeros(2, 5), proposals, rpn_only, teacher_bg=None)
    assert reliability.tolist() == [1.0, 1.0]
    cls_only = _pseudo(cls_box, rpn_uncertain=torch.zeros(0, 4), cls_uncertain=uncertain)
    reliability = losses.reliability(torch.zeros(2, 5), proposals, cls_only, teacher_bg=None)
    assert reliability.tolist() == [0.0, 1.0]


def test_rpn_ignores_only_background_anchors_near_uncertain_boxes():
    detector = build_detector(preset("smoke").detector)
    detector.train()
    images, _ = detector.transform([torch.rand(3, SIZE, SIZE)])
    features = detector.backbone(images.tensors)
    box = torch.tensor([[4.0, 4, 28, 28]])
    target = {"boxes": box, "labels": torch.tensor([1])}
    nothing, everywhere = torch.zeros(0, 4), torch.tensor([[0.0, 0, SIZE, SIZE]])
    torch.manual_seed(0)
    _, ours = rpn_ignoring_uncertain(detector.rpn, images, features, _pseudo(box, nothing, nothing))
    torch.manual_seed(0)
    _, torchvision_losses = detector.rpn(images, features, [target])
    assert ours == torchvision_losses  # no uncertain box: torchvision's RPN exactly
    # The classification's uncertain boxes are not the RPN's business.
    torch.manual_seed(0)
    cls_only = _pseudo(box, rpn_uncertain=nothing, cls_uncertain=everywhere)
    assert rpn_ignoring_uncertain(detector.rpn, images, features, cls_only)[1] == ours

    torch.manual_seed(0)
    rpn_only = _pseudo(box, rpn_uncertain=everywhere, cls_uncertain=nothing)
    _, ignored = rpn_ignoring_uncertain(detector.rpn, images, features, rpn_only)
    assert ignored["loss_objectness"] != ours["loss_objectness"]
    assert torch.isfinite(ignored["loss_objectness"])


def _still_teacher():
    """A teacher whose ROI head regresses nothing: refined boxes are the jittered ones."""
    teacher = build_detector(preset("smoke").detector).eval()
    with torch.no_grad():
        teacher.roi_heads.box_predictor.bbox_pred.weight.zero_()
        teacher.roi_heads.box_predictor.bbox_pred.bias.zero_()
    return teacher


@pytest.mark.parametrize("norm", ["paper", "original"])
def test_variance_norm_and_the_image_clip_reach_the_kernel(norm):
    teacher = _still_teacher()
    with torch.no_grad():
        images, _ = teacher.transform([torch.rand(3, SIZE, SIZE)])
        features = teacher.backbone(images.tensors)
    # w 24, h 40 (the two norms differ), right edge on the border (the clip matters).
    boxes = torch.tensor([[40.0, 10.0, 64.0, 50.0]])
    view = TeacherView(features, images.image_sizes, [boxes], [torch.tensor([1])], [], [])
    cfg = MethodConfig(n_jitter=10, variance_norm=norm)
    torch.manual_seed(3)
    got = jitter_variances(teacher, view, cfg)[0]
    torch.manual_seed(3)
    jittered = jitter_boxes(boxes, cfg.n_jitter, cfg.jitter_scale)
    expected = box_jitter_variance(jittered, boxes, (SIZE, SIZE), norm=norm)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    other = "original" if norm == "paper" else "paper"
    assert not torch.allclose(got, box_jitter_variance(jittered, boxes, (SIZE, SIZE), other))
    unclipped = box_jitter_variance(jittered, boxes, (10 * SIZE, 10 * SIZE), norm=norm)
    assert not torch.allclose(got, unclipped)


def test_jitter_variances_of_a_batch_are_each_image_on_its_own():
    """One decode for every image's jittered copies: each box is refined by its own class's
    regression, as when each image goes alone (an image without candidates in between)."""
    torch.manual_seed(0)
    teacher = build_detector(preset("smoke").detector).eval()
    with torch.no_grad():
        images, _ = teacher.transform([torch.rand(3, SIZE, SIZE) for _ in range(3)])
        features = teacher.backbone(images.tensors)
    boxes = [
        torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 30.0]]),
        torch.zeros(0, 4),
        torch.tensor([[10.0, 12.0, 50.0, 56.0]]),
    ]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64), torch.tensor([3])]
    cfg = MethodConfig(n_jitter=6)
    view = TeacherView(features, images.image_sizes, boxes, labels, [], [])
    torch.manual_seed(5)
    batched = jitter_variances(teacher, view, cfg)
    torch.manual_seed(5)
    alone = [
        jitter_variances(
            teacher,
            TeacherView(
                {k: f[i : i + 1] for k, f in features.items()},
                images.image_sizes[i : i + 1],
                [boxes[i]],
                [labels[i]],
                [],
                [],
            ),
            cfg,
        )[0]
        for i in range(3)
    ]
    assert [len(v) for v in batched] == [2, 0, 1]
    for got, expected in zip(batched, alone, strict=True):
        torch.testing.assert_close(got, expected)


def test_a_profiled_step_reports_every_part_of_the_method():
    """The benchmark's breakdown: each marked part of a Soft Teacher step has its own time
    (nested parts out of their parents), and the shares with ``other`` make the whole step."""
    trainer = SoftTeacherTrainer(_smoke(burn_in_steps=0), torch.device("cpu"))
    result = profile_steps(lambda: trainer.step(_labeled(0.5), _unlabeled(0.2, 0.8)), steps=2)
    assert set(result.part_ms) == set(STEP_PARTS)
    assert all(ms > 0 for ms in result.part_ms.values())
    assert sum(result.part_ms.values()) < result.step_ms
    assert sum(result.shares().values()) == pytest.approx(1.0)
    assert result.top_ops and all(name not in STEP_PARTS for name, _ in result.top_ops)


def test_teacher_scores_student_boxes_mapped_strong_to_weak(monkeypatch):
    """BG-T: a box of the strong view goes to the weak view by T_weak @ inv(T_strong).

    Original 100 x 80. Weak: resized by 0.5 (50 x 40). Strong: full size, flipped (x -> 100 - x).
    Strong [10, 20, 30, 40] -> original [70, 20, 90, 40] -> weak [35, 10, 45, 20]; the wrong
    direction (T_strong @ inv(T_weak)) would give [40, 40, 50, 40].
    """
    seen: list[torch.Tensor] = []

    def scoring_head(detector, features, boxes, image_sizes):
        seen.extend(boxes)
        n = sum(map(len, boxes))
        return torch.zeros(n, 5), torch.zeros(n, 20)

    monkeypatch.setattr(pseudo_labels, "box_head_outputs", scoring_head)
    batch = UnlabeledBatch(
        weak=[torch.zeros(3, 40, 50)],
        strong=[torch.zeros(3, 80, 100)],
        weak_matrices=torch.diag(torch.tensor([0.5, 0.5, 1.0])).unsqueeze(0),
        strong_matrices=torch.tensor([[[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]]]),
        image_ids=[0],
    )
    view = TeacherView({}, [(40, 50)], boxes=[], labels=[], scores=[], variances=[])
    strong_box = torch.tensor([[10.0, 20, 30, 40]])
    background = teacher_background_prob(None, view, batch, [strong_box])
    torch.testing.assert_close(seen[0], torch.tensor([[35.0, 10, 45, 20]]))
    assert background.tolist() == pytest.approx([0.2])  # softmax of 5 equal logits


def test_roi_pooling_scales_do_not_depend_on_the_first_batch():
    """The labeled slice of a padded semi-supervised batch is smaller than its features imply;
    torchvision would infer (and keep) stride 4 for the stride-8 level from such a first call."""
    detector = build_detector(preset("smoke").detector)
    pool = detector.roi_heads.box_roi_pool
    features = {
        name: torch.rand(1, 8, 160 // s, 160 // s) for name, s in (("0", 8), ("1", 16), ("2", 32))
    }
    box = [torch.tensor([[10.0, 10, 60, 60]])]
    sliced = pool(features, box, [(106, 106)])  # first call: a slice padded to 160
    assert pool.scales == [1 / 8, 1 / 16, 1 / 32]
    ratio = preset("smoke").detector.roi_sampling_ratio
    reference = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=ratio)
    torch.testing.assert_close(sliced, reference(features, box, [(160, 160)]))


def test_a_step_is_a_function_of_the_seed_and_the_step():
    """Same seed: the same loss at every step (init, samplers, jitter); another seed: not."""

    def losses(seed: int) -> list[float]:
        cfg = _smoke(burn_in_steps=0).replace(train={"seed": seed})
        trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
        return [trainer.step(_labeled(0.5, n=1), _unlabeled(0.3, 0.7))["loss/total"] for _ in "ab"]

    assert losses(0) == losses(0)
    assert losses(1) != losses(0)


def test_a_teacher_that_is_the_student_is_evaluated_once_for_both(monkeypatch, smoke_fold):
    """During burn-in the teacher copies the student (EMA momentum 0): one evaluation gives
    both models' metrics. After it the EMA teacher differs and each model is evaluated."""
    from softteacher.data.coco import load_coco
    from softteacher.eval import models

    cfg = _smoke(burn_in_steps=1, ema_momentum=0.9, ema_ramp=False).replace(
        train={"max_val_images": 2}
    )
    val = load_coco(smoke_fold.fold.val_ann, smoke_fold.fold.val_images)
    evaluated: list[torch.nn.Module] = []
    real_evaluate = models.evaluate

    def counting(model, *args, **kwargs):
        evaluated.append(model)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(models, "evaluate", counting)
    trainer = SoftTeacherTrainer(cfg, torch.device("cpu"))
    trainer.step(_labeled(0.5, n=cfg.train.supervised_images), None)  # burn-in: a copy
    during = models.evaluate_run(trainer, val, None, cfg).metrics
    assert evaluated == [trainer.teacher]
    student_alone = real_evaluate(trainer.student, val, cfg.augment, max_images=2)
    assert {k: during[f"student/{k}"] for k in student_alone} == student_alone
    trainer.step(_labeled(0.5), _unlabeled(0.2, 0.8))  # after burn-in: the EMA moves apart
    assert not models.same_weights(trainer.teacher, trainer.student)
    models.evaluate_run(trainer, val, None, cfg)
    assert evaluated[1:] == [trainer.teacher, trainer.student]
