"""The method's two hot spots as plain-torch functions (the CPU path and the reference).

Fused GPU versions will live beside them and must match these numerically.
"""

from softteacher.kernels.jitter_variance import box_jitter_variance, clip_to_image, jitter_boxes
from softteacher.kernels.soft_weights import background_reliability, reliability_weighted_ce

__all__ = [
    "background_reliability",
    "box_jitter_variance",
    "clip_to_image",
    "jitter_boxes",
    "reliability_weighted_ce",
]
