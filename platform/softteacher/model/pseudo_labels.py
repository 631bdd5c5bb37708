"""The teacher's side of a step: detect on the weak view, choose pseudo boxes, score boxes.

Everything here runs without gradients on the EMA teacher (notes, steps 3-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function
from torchvision.models.detection import FasterRCNN

from softteacher.config import MethodConfig
from softteacher.data.collate import UnlabeledBatch
from softteacher.data.transforms import transfer_boxes
from softteacher.kernels import box_jitter_variance, jitter_boxes, use_triton
from softteacher.model.detector import box_head_outputs, class_deltas, decode_class_boxes
from softteacher.names import STEP_JITTER, STEP_TEACHER_SCORING

MIN_PSEUDO_BOX_SIDE = 1.0


@dataclass
class TeacherView:
    """What the teacher saw on the weak views, kept to score the student's boxes later."""

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    boxes: list[Tensor]
    labels: list[Tensor]
    scores: list[Tensor]
    variances: list[Tensor]


@dataclass
class PseudoTargets:
    """Pseudo boxes in the strong view: one target list per loss that uses them, and for the
    RPN and the classification loss the boxes they must not call background: candidates at
    or below rpn_thr (``rpn_uncertain``) and cls_thr (``cls_uncertain``), both empty unless
    ``MethodConfig.ignore_uncertain``."""

    rpn: list[dict[str, Tensor]]
    cls: list[dict[str, Tensor]]
    reg: list[dict[str, Tensor]]
    rpn_uncertain: list[Tensor]
    cls_uncertain: list[Tensor]

    def counts_per_image(self) -> dict[str, float]:
        n = max(len(self.cls), 1)
        targets = {
            f"pseudo/{name}_per_image": sum(len(t["boxes"]) for t in boxes) / n
            for name, boxes in (("rpn", self.rpn), ("cls", self.cls), ("reg", self.reg))
        }
        uncertain = {
            f"pseudo/{name}_uncertain_per_image": sum(map(len, boxes)) / n
            for name, boxes in (("rpn", self.rpn_uncertain), ("cls", self.cls_uncertain))
        }
        return targets | uncertain


@torch.no_grad()
def teacher_view(teacher: FasterRCNN, weak: list[Tensor], cfg: MethodConfig) -> TeacherView:
    """Detections on the weak views (per-class NMS inside torchvision's ROI head), kept above
    the candidate score (0.5), with each candidate's jitter variance when the method uses it."""
    image_list, _ = teacher.transform(weak)
    features = teacher.backbone(image_list.tensors)
    proposals, _ = teacher.rpn(image_list, features)
    detections, _ = teacher.roi_heads(features, proposals, image_list.image_sizes)
    boxes, labels, scores = [], [], []
    for det in detections:
        keep = det["scores"] > cfg.candidate_thr
        boxes.append(det["boxes"][keep])
        labels.append(det["labels"][keep])
        scores.append(det["scores"][keep])
    view = TeacherView(features, image_list.image_sizes, boxes, labels, scores, variances=[])
    if cfg.uses_jitter:
        with record_function(STEP_JITTER):
            view.variances = jitter_variances(teacher, view, cfg)
    else:
        view.variances = [torch.zeros_like(s) for s in scores]
    return view


@torch.no_grad()
def jitter_variances(teacher: FasterRCNN, view: TeacherView, cfg: MethodConfig) -> list[Tensor]:
    """Eq. 7-9: refine ``n_jitter`` jittered copies of every candidate with the teacher's ROI
    head (its own class's regression) and measure the spread of the refined boxes, clipped
    to the weak view they were refined in, under ``cfg.variance_norm``; by the fused kernel
    when ``cfg.kernels`` and the device allow (``kernels.dispatch.use_triton``)."""
    jittered = [jitter_boxes(b, cfg.n_jitter, cfg.jitter_scale) for b in view.boxes]
    flat = [j.reshape(-1, 4) for j in jittered]
    _, deltas = box_head_outputs(teacher, view.features, flat, view.image_sizes)
    # one decode for every image's copies: jitter-major within an image, as ``flat`` is
    labels = torch.cat([lab.repeat(cfg.n_jitter) for lab in view.labels])
    if use_triton(deltas, cfg.kernels):
        return _fused_jitter_variances(teacher, view, jittered, class_deltas(deltas, labels), cfg)
    refined = decode_class_boxes(teacher, deltas, torch.cat(flat), labels)
    variances = []
    for boxes, image_refined, size in zip(
        view.boxes, refined.split([len(f) for f in flat]), view.image_sizes, strict=True
    ):
        if len(boxes) == 0:
            variances.append(boxes.new_zeros(0))
            continue
        copies = image_refined.reshape(cfg.n_jitter, -1, 4)
        variances.append(box_jitter_variance(copies, boxes, size, norm=cfg.variance_norm))
    return variances


def _fused_jitter_variances(
    teacher: FasterRCNN,
    view: TeacherView,
    jittered: list[Tensor],
    deltas: Tensor,
    cfg: MethodConfig,
) -> list[Tensor]:
    """``jitter_variances`` by the fused kernel, one launch an image: decode (with the
    teacher's box coder), clip, std and normalisation of each image's ``(n_jitter, N, 4)``
    copies from their own class's ``deltas`` (all images', jitter-major within each)."""
    # imported here: triton is optional, and only a CUDA run gets this far
    from softteacher.kernels.triton_jitter_variance import fused_jitter_variance

    coder = teacher.roi_heads.box_coder
    per_image = deltas.split([copies.shape[0] * copies.shape[1] for copies in jittered])
    return [
        fused_jitter_variance(
            image_deltas.view(copies.shape),
            copies,
            boxes,
            size,
            norm=cfg.variance_norm,
            weights=coder.weights,
            bbox_xform_clip=coder.bbox_xform_clip,
        )
        for boxes, copies, image_deltas, size in zip(
            view.boxes, jittered, per_image, view.image_sizes, strict=True
        )
    ]


def pseudo_targets(view: TeacherView, batch: UnlabeledBatch, cfg: MethodConfig) -> PseudoTargets:
    """Candidates mapped into the strong views and split by use (notes, steps 4 and 6):
    ``rpn`` score > rpn_thr (class-agnostic), ``cls`` score > cls_thr, ``reg`` the candidates
    whose jitter variance is below reg_thr (the cls boxes when the method has no jittering).
    With ``ignore_uncertain`` the other candidates are each loss's uncertain boxes: the RPN's
    by rpn_thr, the classification's by cls_thr."""
    rpn, cls, reg, rpn_uncertain, cls_uncertain = [], [], [], [], []
    for i, (boxes, labels, scores, variances) in enumerate(
        zip(view.boxes, view.labels, view.scores, view.variances, strict=True)
    ):
        height, width = batch.strong[i].shape[-2:]
        mapped = transfer_boxes(
            boxes, batch.weak_matrices[i], batch.strong_matrices[i], (height, width)
        )
        sides = torch.minimum(mapped[:, 2] - mapped[:, 0], mapped[:, 3] - mapped[:, 1])
        visible = sides >= MIN_PSEUDO_BOX_SIDE
        rpn_keep = visible & (scores > cfg.rpn_thr)
        cls_keep = visible & (scores > cfg.cls_thr)
        rpn.append(_target(mapped[rpn_keep], torch.ones_like(labels[rpn_keep])))
        cls.append(_target(mapped[cls_keep], labels[cls_keep]))
        reg_keep = visible & (variances < cfg.reg_thr)
        reg.append(_target(mapped[reg_keep], labels[reg_keep]))
        rpn_uncertain.append(_uncertain(mapped, visible & ~rpn_keep, cfg))
        cls_uncertain.append(_uncertain(mapped, visible & ~cls_keep, cfg))
    # Without jittering the regression loss uses the classification boxes themselves; the
    # same object lets the student reuse one RoI sampling for both losses.
    return PseudoTargets(
        rpn=rpn,
        cls=cls,
        reg=reg if cfg.uses_jitter else cls,
        rpn_uncertain=rpn_uncertain,
        cls_uncertain=cls_uncertain,
    )


@torch.no_grad()
def teacher_background_prob(
    teacher: FasterRCNN, view: TeacherView, batch: UnlabeledBatch, strong_boxes: list[Tensor]
) -> Tensor:
    """The teacher's background probability (raw softmax, no NMS) of the student's sampled
    boxes, each mapped from its strong view into the weak view the teacher saw (BG-T)."""
    with record_function(STEP_TEACHER_SCORING):
        weak_boxes = [
            transfer_boxes(
                boxes, batch.strong_matrices[i], batch.weak_matrices[i], view.image_sizes[i]
            )
            for i, boxes in enumerate(strong_boxes)
        ]
        logits, _ = box_head_outputs(teacher, view.features, weak_boxes, view.image_sizes)
        return logits.softmax(dim=-1)[:, 0]


def _target(boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
    return {"boxes": boxes.reshape(-1, 4).float(), "labels": labels.to(torch.int64)}


def _uncertain(mapped: Tensor, below_thr: Tensor, cfg: MethodConfig) -> Tensor:
    """The candidates below a loss's threshold, or none unless ``cfg.ignore_uncertain``."""
    keep = below_thr if cfg.ignore_uncertain else torch.zeros_like(below_thr)
    return mapped[keep].reshape(-1, 4).float()
