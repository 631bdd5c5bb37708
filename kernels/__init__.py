"""The method's two hot spots as plain-torch functions (the CPU path and the reference).

Fused Triton versions live beside them, in modules a caller imports only once
``use_triton`` (``dispatch.py``) chose them, since they import triton at their top:
``triton_soft_weights.fused_reliability_weighted_ce`` (Eq. 4-5) and
``triton_jitter_variance.fused_jitter_variance`` (Eq. 7-9, decode included, matched by
``refined_jitter_variance``). ``tests/test_kernels_triton.py`` holds them to these.
"""

from softteacher.kernels.dispatch import triton_available, use_triton
from softteacher.kernels.jitter_variance import (
    box_jitter_variance,
    clip_to_image,
    jitter_boxes,
    refined_jitter_variance,
)
from softteacher.kernels.soft_weights import background_reliability, reliability_weighted_ce

__all__ = [
    "background_reliability",
    "box_jitter_variance",
    "clip_to_image",
    "jitter_boxes",
    "refined_jitter_variance",
    "reliability_weighted_ce",
    "triton_available",
    "use_triton",
]
