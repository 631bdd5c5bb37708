"""Samples (numpy, per image) to the tensors the detector takes, on a device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from softteacher.data.samples import LabeledSample, UnlabeledSample


@dataclass
class DetectionBatch:
    """Labeled images (CHW float in [0, 1]) and torchvision-style targets in their pixels."""

    images: list[Tensor]
    targets: list[dict[str, Tensor]]


@dataclass
class UnlabeledBatch:
    """Weak and strong views of the same images, with the matrices from the original."""

    weak: list[Tensor]
    strong: list[Tensor]
    weak_matrices: Tensor
    strong_matrices: Tensor
    image_ids: list[int]


def image_tensor(image: np.ndarray, device: torch.device) -> Tensor:
    """HWC uint8 to CHW float in [0, 1]; decoded images are read-only, so copy those."""
    writable = np.require(image, requirements=["C", "W"])
    return torch.from_numpy(writable).to(device).permute(2, 0, 1).float() / 255.0


def collate_labeled(samples: Sequence[LabeledSample], device: torch.device) -> DetectionBatch:
    return DetectionBatch(
        images=[image_tensor(s.image, device) for s in samples],
        targets=[
            {
                "boxes": torch.as_tensor(s.boxes, dtype=torch.float32, device=device).reshape(
                    -1, 4
                ),
                "labels": torch.as_tensor(s.labels, dtype=torch.int64, device=device).reshape(-1),
            }
            for s in samples
        ],
    )


def collate_unlabeled(samples: Sequence[UnlabeledSample], device: torch.device) -> UnlabeledBatch:
    return UnlabeledBatch(
        weak=[image_tensor(s.weak.image, device) for s in samples],
        strong=[image_tensor(s.strong.image, device) for s in samples],
        weak_matrices=torch.as_tensor(
            np.stack([s.weak.matrix for s in samples]), dtype=torch.float32, device=device
        ),
        strong_matrices=torch.as_tensor(
            np.stack([s.strong.matrix for s in samples]), dtype=torch.float32, device=device
        ),
        image_ids=[int(s.image_id) for s in samples],
    )
