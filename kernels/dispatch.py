"""Which implementation of a hot spot runs: the fused Triton kernel or the plain-torch reference.

The Triton modules (``triton_*.py``) import triton at their top, so a caller imports them only
once ``use_triton`` said yes: triton stays optional, and a CPU run never compiles anything.
"""

from __future__ import annotations

import functools
from typing import Literal

from torch import Tensor

KernelChoice = Literal["auto", "reference"]


@functools.cache
def triton_available() -> bool:
    """Whether triton imports here (it is optional; a CPU-only install may lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: Tensor, choice: KernelChoice) -> bool:
    """``"auto"``: the Triton kernel for a CUDA tensor when triton imports, else the reference;
    ``"reference"``: always the reference. The CPU path is the reference, so a CPU run gives
    the same numbers with either choice."""
    if choice not in ("auto", "reference"):
        raise ValueError(f"unknown kernels choice {choice!r}; use 'auto' or 'reference'")
    return choice == "auto" and tensor.is_cuda and triton_available()
