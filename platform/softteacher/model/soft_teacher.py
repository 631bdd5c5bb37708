"""The student's losses: supervised on labeled images, pseudo-labeled on strong views.

One module and one forward for all of them, so that DistributedDataParallel sees every
gradient of a step in one call. The teacher is not part of it: it is passed in as the
pseudo targets it produced and a function that scores boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import box_iou

from softteacher.config import MethodConfig
from softteacher.kernels import background_reliability, reliability_weighted_ce, use_triton
from softteacher.model.detector import box_head_outputs
from softteacher.model.pseudo_labels import PseudoTargets

BoxScorer = Callable[[list[Tensor]], Tensor]

SUPERVISED_LOSSES = ("sup_rpn_objectness", "sup_rpn_box", "sup_cls", "sup_reg")
UNSUPERVISED_LOSSES = ("unsup_rpn_objectness", "unsup_rpn_box", "unsup_cls", "unsup_reg")


class StudentLosses(nn.Module):
    """The student detector and the loss of Eq. 1-3 and 10-11, its parts kept apart.

    Torchvision's losses are means over the sampled anchors and RoIs of all images, which
    stands in for the per-image normalisation of Eq. 2-3 (every image samples the same number).
    """

    def __init__(self, detector: FasterRCNN, cfg: MethodConfig) -> None:
        super().__init__()
        self.detector = detector
        self.cfg = cfg

    def forward(
        self,
        labeled_images: list[Tensor],
        labeled_targets: list[dict[str, Tensor]],
        strong_images: list[Tensor] | None = None,
        pseudo: PseudoTargets | None = None,
        teacher_bg: BoxScorer | None = None,
    ) -> dict[str, Tensor]:
        if strong_images and pseudo is None:
            raise ValueError("strong views given without pseudo targets")
        if strong_images and self.cfg.student_forward == "separate":
            labeled = self._features(labeled_images)
            with running_stats_frozen(self.detector.backbone):
                unlabeled = self._features(strong_images)
        else:
            images, features = self._features(labeled_images + (strong_images or []))
            n_labeled = len(labeled_images)
            labeled = _split(images, features, 0, n_labeled)
            unlabeled = _split(images, features, n_labeled, len(images.image_sizes))
        losses = self._supervised(*labeled, labeled_targets)
        if strong_images:
            losses.update(self._unsupervised(*unlabeled, pseudo, teacher_bg))
        return losses

    def _features(self, images: list[Tensor]) -> tuple[ImageList, dict[str, Tensor]]:
        image_list, _ = self.detector.transform(images)
        return image_list, self.detector.backbone(image_list.tensors)

    def _supervised(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """L_s of Eq. 2: the standard Faster R-CNN losses on ground truth."""
        proposals, rpn = self.detector.rpn(images, features, targets)
        _, roi = self.detector.roi_heads(features, proposals, images.image_sizes, targets)
        return {
            "sup_rpn_objectness": rpn["loss_objectness"],
            "sup_rpn_box": rpn["loss_rpn_box_reg"],
            "sup_cls": roi["loss_classifier"],
            "sup_reg": roi["loss_box_reg"],
        }

    def _unsupervised(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        pseudo: PseudoTargets,
        teacher_bg: BoxScorer | None,
    ) -> dict[str, Tensor]:
        """L_u of Eq. 11: RPN on ``rpn`` boxes, soft-weighted classification (Eq. 4-5) on
        ``cls`` boxes, and regression (Eq. 10) on the jitter-reliable ``reg`` boxes."""
        proposals, rpn = rpn_ignoring_uncertain(self.detector.rpn, images, features, pseudo)
        losses = {
            "unsup_rpn_objectness": rpn["loss_objectness"],
            "unsup_rpn_box": rpn["loss_rpn_box_reg"],
        }
        heads = self.detector.roi_heads
        boxes, _, labels, targets = heads.select_training_samples(proposals, pseudo.cls)
        logits, deltas = box_head_outputs(self.detector, features, boxes, images.image_sizes)
        labels_flat = torch.cat(labels)
        reliability = self.reliability(logits, boxes, pseudo, teacher_bg)
        losses["unsup_cls"] = soft_weighted_ce(logits, labels_flat, reliability, self.cfg)
        if pseudo.reg is not pseudo.cls:
            boxes, _, labels, targets = heads.select_training_samples(proposals, pseudo.reg)
            logits, deltas = box_head_outputs(self.detector, features, boxes, images.image_sizes)
        losses["unsup_reg"] = fastrcnn_loss(logits, deltas, labels, targets)[1]
        return losses

    def reliability(
        self,
        logits: Tensor,
        boxes: list[Tensor],
        pseudo: PseudoTargets,
        teacher_bg: BoxScorer | None,
    ) -> Tensor:
        """``r`` of every sampled box under the configured indicator (Sec. 3.2)."""
        indicator = self.cfg.effective_indicator
        student_bg = logits.detach().softmax(dim=-1)[:, 0]
        if indicator in ("bg_teacher", "pred_diff"):
            if teacher_bg is None:
                raise ValueError(f"indicator {indicator!r} needs the teacher's box scorer")
            teacher = teacher_bg(boxes)
        else:
            teacher = torch.zeros_like(student_bg)
        max_iou = torch.cat([_max_iou(b, t["boxes"]) for b, t in zip(boxes, pseudo.cls)])
        reliability = background_reliability(
            indicator, teacher_bg=teacher, student_bg=student_bg, max_iou=max_iou
        )
        # A box that would be foreground were an uncertain box an object is not background.
        fg_iou = self.detector.roi_heads.proposal_matcher.high_threshold
        uncertain_iou = torch.cat([_max_iou(b, u) for b, u in zip(boxes, pseudo.cls_uncertain)])
        return torch.where(uncertain_iou >= fg_iou, torch.zeros_like(reliability), reliability)


def soft_weighted_ce(
    logits: Tensor, labels: Tensor, reliability: Tensor, cfg: MethodConfig
) -> Tensor:
    """Eq. 4-5 under ``cfg.soft_weight_norm``: by the fused kernel when ``cfg.kernels`` and the
    device allow (``kernels.dispatch.use_triton``), else by the reference."""
    if use_triton(logits, cfg.kernels):
        # imported here: triton is optional, and only a CUDA run gets this far
        from softteacher.kernels.triton_soft_weights import fused_reliability_weighted_ce

        return fused_reliability_weighted_ce(logits, labels, reliability, cfg.soft_weight_norm)
    return reliability_weighted_ce(logits, labels, reliability, cfg.soft_weight_norm)


def rpn_ignoring_uncertain(
    rpn: RegionProposalNetwork,
    images: ImageList,
    features: dict[str, Tensor],
    pseudo: PseudoTargets,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Torchvision's RPN forward on the ``rpn`` pseudo boxes, except that anchors it would
    call background but that overlap an ``rpn_uncertain`` box (a candidate at or below
    rpn_thr) as much as a non-negative anchor overlaps its object are ignored (label -1)
    rather than taught "no object"."""
    if not any(len(u) for u in pseudo.rpn_uncertain):
        return rpn(images, features, pseudo.rpn)
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(images, levels)
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    decoded = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(decoded, objectness, images.image_sizes, per_level)
    labels, matched = rpn.assign_targets_to_anchors(anchors, pseudo.rpn)
    bg_iou = rpn.proposal_matcher.low_threshold
    for image_labels, image_anchors, uncertain in zip(labels, anchors, pseudo.rpn_uncertain):
        near_uncertain = _max_iou(image_anchors, uncertain) >= bg_iou
        image_labels[(image_labels == 0.0) & near_uncertain] = -1.0
    targets = rpn.box_coder.encode(matched, anchors)
    loss_objectness, loss_box = rpn.compute_loss(objectness, deltas, labels, targets)
    return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise by the batch's statistics, as in training,
    without moving their running statistics towards it (``track_running_stats`` off)."""
    norms = [
        m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


def _max_iou(boxes: Tensor, pseudo_boxes: Tensor) -> Tensor:
    if len(pseudo_boxes) == 0:
        return boxes.new_zeros(len(boxes))
    return box_iou(boxes, pseudo_boxes).max(dim=1).values


def _split(
    images: ImageList, features: dict[str, Tensor], start: int, stop: int
) -> tuple[ImageList, dict[str, Tensor]]:
    """The images ``start:stop`` of a batch that went through the backbone together."""
    part = ImageList(images.tensors[start:stop], images.image_sizes[start:stop])
    return part, {name: f[start:stop] for name, f in features.items()}
