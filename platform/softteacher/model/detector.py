"""Faster R-CNN from torchvision, assembled from parts for each preset.

Images reach the detector already at their final size (the data stage resizes the weak,
strong and test views and records the matrices), so the detector's own transform only
normalises and batches: a resize inside the model would silently break the view matrices.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import initLevelMapper

from softteacher.config import DetectorConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """The backbone weights file named in the config does not exist."""


class NormalizeOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's transform without its resize: normalise, pad and batch."""

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


class KnownStrideRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign with the backbone's strides given up front.

    torchvision infers each level's scale on the first call, from the largest image of that
    call, and keeps it for the life of the model. A semi-supervised step pools the labeled
    images' slice of a batch padded for larger strong views: inferred there, a stride of 8
    comes out as 4 and every later RoI is pooled from the wrong place (measured: a trained
    student's classification loss 0.03 -> 0.8 at its first step, then collapse).
    """

    def __init__(
        self, featmap_names: list[str], strides: list[int], sampling_ratio: int = 2
    ) -> None:
        super().__init__(
            featmap_names=featmap_names, output_size=7, sampling_ratio=sampling_ratio
        )
        self.scales = [1.0 / stride for stride in strides]
        self.map_levels = initLevelMapper(
            int(math.log2(strides[0])),
            int(math.log2(strides[-1])),
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
        )


class MixedPrecisionBackbone(BackboneWithFPN):
    """Backbone and FPN under bfloat16 autocast, their features returned in float32.

    The convolutions are where a step's time goes; the heads stay float32 because boxes
    decoded in bfloat16 (8 bits of mantissa) would move by a pixel at 128 px and by 4 at
    1000. Same parameters and state-dict keys as ``BackboneWithFPN``: a checkpoint loads
    into either.
    """

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            features = super().forward(x)
        return OrderedDict((name, value.float()) for name, value in features.items())


def _backbone_class(cfg: DetectorConfig) -> type[BackboneWithFPN]:
    return MixedPrecisionBackbone if cfg.amp == "bf16" else BackboneWithFPN


def build_detector(cfg: DetectorConfig) -> FasterRCNN:
    """The Faster R-CNN of a preset: ``r50-fpn`` (the paper's) or ``slim`` (CPU)."""
    if cfg.preset == "r50-fpn":
        backbone = _r50_fpn_backbone(cfg)
        featmap_names, strides = ["0", "1", "2", "3"], [4, 8, 16, 32]
    elif cfg.preset == "slim":
        backbone = _slim_backbone(cfg)
        featmap_names, strides = ["0", "1", "2"], [8, 16, 32]
    else:
        raise ValueError(f"unknown detector preset {cfg.preset!r}; use 'r50-fpn' or 'slim'")

    num_levels = len(featmap_names) + 1  # the max-pool level on top
    if len(cfg.anchor_sizes) != num_levels:
        raise ValueError(
            f"detector preset {cfg.preset!r} has {num_levels} feature levels but "
            f"anchor_sizes has {len(cfg.anchor_sizes)}; give one size a level"
        )
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes),
        aspect_ratios=((0.5, 1.0, 2.0),) * num_levels,
    )
    roi_pool = KnownStrideRoIAlign(featmap_names, strides, cfg.roi_sampling_ratio)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim)
    predictor = FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes + 1)
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=predictor,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.rois_per_image,
        box_positive_fraction=cfg.positive_fraction,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
    )
    model.transform = NormalizeOnlyTransform(
        min_size=1, max_size=1, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )
    return model


def _slim_backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    """ResNet-18, or a shallower ResNet of its widths (``slim_blocks``), with trainable
    BatchNorm (it starts from random init) and a narrow FPN on C3-C5."""
    body = ResNet(BasicBlock, list(cfg.slim_blocks), norm_layer=nn.BatchNorm2d)
    _load_backbone_weights(body, cfg.backbone_weights)
    return _backbone_class(cfg)(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _r50_fpn_backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    """The paper's ResNet-50 + FPN: frozen BatchNorm, stem and layer1 frozen as in Detectron."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if cfg.backbone_weights is None:
        warnings.warn(
            "r50-fpn without backbone_weights starts from random init; the paper uses "
            "ImageNet weights: pass a local file (--set detector.backbone_weights=resnet50.pth)",
            stacklevel=3,
        )
    _load_backbone_weights(body, cfg.backbone_weights)
    for name, param in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            param.requires_grad_(False)
    return _backbone_class(cfg)(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[256, 512, 1024, 2048],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _load_backbone_weights(body: nn.Module, path: str | None) -> None:
    """ImageNet weights from a local file only: training must never wait on a download."""
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise MissingWeightsError(
            f"backbone weights file {file} not found; download the torchvision ImageNet "
            "checkpoint once and pass its local path (detector.backbone_weights)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights file {file} does not fit the backbone "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use a torchvision ResNet "
            "state dict"
        )


def box_head_outputs(
    detector: FasterRCNN,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
) -> tuple[Tensor, Tensor]:
    """Class logits ``(N, K+1)`` and box deltas ``(N, 4(K+1))`` of the ROI head on given boxes.

    The one way the method runs a ROI head on boxes of its choosing: the student's sampled
    proposals, the teacher's scoring of them, and the teacher's refinement of jittered boxes.
    """
    heads = detector.roi_heads
    pooled = heads.box_roi_pool(features, boxes, image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


def decode_class_boxes(
    detector: FasterRCNN, deltas: Tensor, boxes: Tensor, labels: Tensor
) -> Tensor:
    """Boxes refined by the regression of each box's own class: ``refine`` of Eq. 7."""
    decoded = detector.roi_heads.box_coder.decode(deltas, [boxes])
    return decoded[torch.arange(len(labels), device=labels.device), labels]


def class_deltas(deltas: Tensor, labels: Tensor) -> Tensor:
    """Each box's ``(4,)`` regression of its own class, from the ROI head's ``(N, 4(K+1))``:
    what ``decode_class_boxes`` decodes, picked before decoding instead of after."""
    per_class = deltas.view(len(deltas), deltas.shape[1] // 4, 4)
    return per_class[torch.arange(len(labels), device=labels.device), labels]
