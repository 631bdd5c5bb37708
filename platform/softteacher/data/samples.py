"""The records that flow from the data stage to the model stage.

Images are HWC ``uint8`` numpy arrays until collation, so that the same samples can be
built in-process or inside Ray Data's ``map_batches``; boxes are ``float32`` ``(N, 4)``
``x1, y1, x2, y2`` in the pixels of the image they travel with; labels are contiguous
``1..K`` (0 is torchvision's background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One validated COCO image and its annotations, labels already contiguous."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class View:
    """An augmented image and the 3x3 matrix mapping original pixels into it."""

    image: np.ndarray
    matrix: np.ndarray


@dataclass(frozen=True)
class LabeledSample:
    """A labeled image after augmentation, its boxes mapped into the view."""

    image_id: int
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class UnlabeledSample:
    """Two views of one unlabeled image: ``weak`` for the teacher, ``strong`` for the student."""

    image_id: int
    weak: View
    strong: View
