"""The fused Triton kernels compiled for an H100 (sm_90) with no GPU.

Each launch the two fused functions make (the weighted cross-entropy forward and backward
at float32, bfloat16 and float16 logits, and the jitter variance; both norms of each) is
captured from a call on CPU tensors with the launch itself held back, and compiled as
Triton would compile it on CUDA: to PTX and, with the ptxas Triton ships, to a
cubin. A kernel that does not compile, or uses what this Triton lacks, fails in CI rather
than in a GPU check's few minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)  # an H100's compute capability, warps of 32
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its arguments and its compile-time constants."""

    kernel: JITFunction
    args: tuple[object, ...]
    constexprs: dict[str, object]


def _launches(call: Callable[[], object]) -> list[Launch]:
    """Every kernel launch ``call()`` makes, captured instead of run."""
    seen: list[Launch] = []

    def capture(self, *args, grid, warmup, **kwargs):
        seen.append(Launch(self, args, kwargs))

    with mock.patch.object(JITFunction, "run", capture):
        call()
    return seen


def _arg_type(value: object) -> str:
    """Triton's signature type of a launch argument, as its launcher would type it."""
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    assert isinstance(value, torch.Tensor), f"a launch argument of type {type(value)}"
    return POINTER_TYPES[value.dtype]


def _compile(launch: Launch) -> triton.compiler.CompiledKernel:
    """``launch`` compiled for an H100: its PTX and, by Triton's own ptxas, its cubin."""
    names = launch.kernel.arg_names
    signature = {name: _arg_type(value) for name, value in zip(names, launch.args)}
    signature |= {name: "constexpr" for name in launch.constexprs}
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=launch.constexprs)
    return triton.compile(source, target=HOPPER)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("norm", ["joint", "paper"])
def test_the_reliability_weighted_ce_kernels_compile_for_hopper(dtype, norm):
    from softteacher.kernels.triton_soft_weights import fused_reliability_weighted_ce

    logits = torch.randn(512, 81, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 81, (512,))
    reliability = torch.rand(512)

    def forward_and_backward():
        fused_reliability_weighted_ce(logits, labels, reliability, norm).backward()

    launches = _launches(forward_and_backward)
    assert [launch.kernel.fn.__name__ for launch in launches] == [
        "_rows_forward", "_finish_forward", "_rows_backward"
    ]
    for launch in launches:
        compiled = _compile(launch)
        assert ".target sm_90" in compiled.asm["ptx"]
        assert compiled.asm["cubin"]


@pytest.mark.parametrize("norm", ["paper", "original"])
def test_the_jitter_variance_kernel_compiles_for_hopper(norm):
    from softteacher.kernels.triton_jitter_variance import fused_jitter_variance

    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).repeat(100, 1)
    jittered = boxes.expand(10, 100, 4).contiguous()
    deltas = torch.randn(10, 100, 4)
    (launch,) = _launches(lambda: fused_jitter_variance(deltas, jittered, boxes, (128, 128), norm))
    compiled = _compile(launch)
    assert ".target sm_90" in compiled.asm["ptx"]
    assert compiled.asm["cubin"]
