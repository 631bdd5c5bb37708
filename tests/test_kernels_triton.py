"""The fused Triton kernels against their plain-torch references: values and gradients on
random and edge inputs, both norms, and the two call sites' fused paths.

``@triton.jit`` picks Triton's interpreter when the kernel is defined, from
``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret``, read at decoration): a process
that imported the kernel modules without it (an xdist worker that ran a CUDA test) cannot
interpret them, and setting it here would leak into other tests. So on CPU this file runs
itself as a script in a subprocess with ``TRITON_INTERPRET=1`` (once a session, shared by
xdist's workers), which saves the fused results; every comparison runs here, against
references computed here. On CUDA the kernels run compiled, in this process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from filelock import FileLock
from torch import Tensor

from softteacher.config import MethodConfig
from softteacher.kernels import (
    jitter_boxes,
    refined_jitter_variance,
    reliability_weighted_ce,
    triton_available,
    use_triton,
)

GRAD_SCALE = 1.7  # the loss is scaled before backward: the kernel must use its gradient
CE_NORMS = ("joint", "paper")
VARIANCE_NORMS = ("paper", "original")

# name: rows, classes, share of foreground rows, logit scale, reliability scale, dtype
CE_CASES: dict[str, tuple[int, int, float, float, float, torch.dtype]] = {
    "random": (37, 9, 0.3, 2.0, 1.0, torch.float32),
    "coco_classes": (70, 81, 0.25, 3.0, 1.0, torch.float32),
    "no_rows": (0, 9, 0.3, 2.0, 1.0, torch.float32),
    "one_foreground_row": (1, 9, 1.0, 2.0, 1.0, torch.float32),
    "one_background_row": (1, 9, 0.0, 2.0, 1.0, torch.float32),
    "all_background": (40, 9, 0.0, 2.0, 1.0, torch.float32),
    "all_foreground": (40, 9, 1.0, 2.0, 1.0, torch.float32),
    "zero_reliability": (30, 9, 0.3, 2.0, 0.0, torch.float32),
    "all_background_zero_reliability": (30, 9, 0.0, 2.0, 0.0, torch.float32),
    # background reliabilities summing to less than the paper norm's 1e-6 clamp
    "tiny_reliability": (30, 9, 0.3, 2.0, 1e-8, torch.float32),
    "large_logits": (25, 9, 0.3, 80.0, 1.0, torch.float32),
    # one row a program and more programs than the finishing kernel reads at once
    "wide_rows_many_programs": (130, 2049, 0.3, 2.0, 1.0, torch.float32),
    "float16": (37, 9, 0.3, 2.0, 1.0, torch.float16),
    "bfloat16": (37, 81, 0.3, 2.0, 1.0, torch.bfloat16),
}

# name: candidates, jitters, image (height, width), delta scale, coder weights, clip
JITTER_CASES: dict[str, tuple[int, int, tuple[int, int], float, tuple, float | None]] = {
    "random": (23, 10, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "two_jitters": (9, 2, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "sixteen_jitters": (5, 16, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "no_boxes": (0, 10, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "one_box": (1, 10, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "many_boxes": (100, 10, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "degenerate": (12, 10, (200, 300), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "past_the_border": (30, 10, (100, 120), 0.5, (10.0, 10.0, 5.0, 5.0), None),
    "clipped_log_size": (15, 10, (200, 300), 40.0, (10.0, 10.0, 5.0, 5.0), None),
    "other_coder": (15, 10, (200, 300), 0.5, (1.0, 2.0, 1.0, 2.0), 1.5),
}


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _ce_inputs(case: str, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (the case's dtype), labels (0: background) and reliabilities of a case."""
    rows, classes, fg_share, logit_scale, r_scale, dtype = CE_CASES[case]
    g = _generator(case)
    logits = torch.randn(rows, classes, generator=g) * logit_scale
    foreground = torch.rand(rows, generator=g) < fg_share
    labels = torch.randint(1, classes, (rows,), generator=g) * foreground
    reliability = torch.rand(rows, generator=g) * r_scale
    return logits.to(device, dtype), labels.to(device), reliability.to(device)


def _jitter_inputs(case: str, device: str) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """Deltas, jittered copies (both ``(n_jitter, N, 4)``), candidates and image of a case."""
    n_boxes, n_jitter, (height, width), delta_scale, _, _ = JITTER_CASES[case]
    g = _generator(case)
    corner = torch.rand(n_boxes, 2, generator=g) * torch.tensor([width, height]) * 0.8
    size = 2.0 + torch.rand(n_boxes, 2, generator=g) * 60.0
    if case == "past_the_border":  # from well outside to well past the far side
        corner = torch.rand(n_boxes, 2, generator=g) * 220.0 - 60.0
        size = size * 2
    boxes = torch.cat([corner, corner + size], dim=1)
    if case == "degenerate":  # zero width, zero height, or both
        boxes[0::3, 2] = boxes[0::3, 0]
        boxes[1::3, 3] = boxes[1::3, 1]
        boxes[2::3, 2:] = boxes[2::3, :2]
    jittered = jitter_boxes(boxes, n_jitter, 0.06, g)
    if case == "degenerate":  # copies of zero width at jittered places
        jittered[:, 0::2, 2] = jittered[:, 0::2, 0]
    deltas = torch.randn(n_jitter, n_boxes, 4, generator=g) * delta_scale
    return deltas.to(device), jittered.to(device), boxes.to(device), (height, width)


def _coder(case: str) -> dict[str, object]:
    _, _, _, _, weights, clip = JITTER_CASES[case]
    return {"weights": weights} | ({} if clip is None else {"bbox_xform_clip": clip})


def _call_site_inputs(device: str):
    """A smoke teacher (random weights) on three weak views, one without candidates."""
    from softteacher.model.detector import build_detector
    from softteacher.model.pseudo_labels import TeacherView
    from softteacher.presets import preset

    torch.manual_seed(0)
    teacher = build_detector(preset("smoke").detector).eval().to(device)
    with torch.no_grad():
        images, _ = teacher.transform([torch.rand(3, 64, 64, device=device) for _ in range(3)])
        features = teacher.backbone(images.tensors)
    boxes = [
        torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 66.0, 30.0], [50, 50, 50, 70]]),
        torch.zeros(0, 4),
        torch.tensor([[10.0, 12.0, 50.0, 56.0]]),
    ]
    labels = [torch.tensor([1, 2, 3]), torch.zeros(0, dtype=torch.int64), torch.tensor([3])]
    view = TeacherView(
        features,
        images.image_sizes,
        [b.to(device) for b in boxes],
        [lab.to(device) for lab in labels],
        [],
        [],
    )
    return teacher, view


def fused_outputs(device: str, force: bool) -> dict[str, Tensor]:
    """Every case's fused results, and both paths of the call sites (``force``: the call
    sites take the fused path on any device, as the interpreter runs it on CPU)."""
    from softteacher.kernels.triton_jitter_variance import fused_jitter_variance
    from softteacher.kernels.triton_soft_weights import fused_reliability_weighted_ce
    from softteacher.model import pseudo_labels, soft_teacher

    out: dict[str, Tensor] = {}
    for case in CE_CASES:
        for norm in CE_NORMS:
            logits, labels, reliability = _ce_inputs(case, device)
            logits.requires_grad_()
            loss = fused_reliability_weighted_ce(logits, labels, reliability, norm)
            (loss * GRAD_SCALE).backward()
            out[f"ce/{case}/{norm}/loss"] = loss.detach().cpu()
            out[f"ce/{case}/{norm}/grad"] = logits.grad.cpu()
    for case in JITTER_CASES:
        for norm in VARIANCE_NORMS:
            deltas, jittered, boxes, image = _jitter_inputs(case, device)
            variance = fused_jitter_variance(deltas, jittered, boxes, image, norm, **_coder(case))
            out[f"jitter/{case}/{norm}"] = variance.cpu()

    def auto_is_triton(tensor: Tensor, choice: str) -> bool:
        return choice == "auto" if force else use_triton(tensor, choice)

    with (
        mock.patch.object(pseudo_labels, "use_triton", auto_is_triton),
        mock.patch.object(soft_teacher, "use_triton", auto_is_triton),
    ):
        teacher, view = _call_site_inputs(device)
        for norm in VARIANCE_NORMS:
            for kernels in ("auto", "reference"):
                cfg = MethodConfig(n_jitter=6, variance_norm=norm, kernels=kernels)
                torch.manual_seed(5)
                variances = pseudo_labels.jitter_variances(teacher, view, cfg)
                out[f"site/jitter/{norm}/{kernels}"] = torch.cat(variances).cpu()
        for norm in CE_NORMS:
            for kernels in ("auto", "reference"):
                logits, labels, reliability = _ce_inputs("coco_classes", device)
                logits.requires_grad_()
                cfg = MethodConfig(soft_weight_norm=norm, kernels=kernels)
                loss = soft_teacher.soft_weighted_ce(logits, labels, reliability, cfg)
                loss.backward()
                out[f"site/ce/{norm}/{kernels}/loss"] = loss.detach().cpu()
                out[f"site/ce/{norm}/{kernels}/grad"] = logits.grad.cpu()
    return out


@dataclass(frozen=True)
class Fused:
    device: str
    outputs: dict[str, Tensor]


def _interpreted_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tensor]:
    """The fused results on CPU, from this file run under the interpreter once a session:
    xdist's workers share one file, made by the first under a lock."""
    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = folder.parent  # the session's folder, above each worker's own
    saved = folder / "triton-interpreted.pt"
    with FileLock(f"{saved}.lock"):
        if not saved.is_file():
            run = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), str(saved)],
                env=os.environ | {"TRITON_INTERPRET": "1"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            if run.returncode != 0:
                pytest.fail(
                    f"the interpreted kernels failed:\n{run.stdout[-2000:]}{run.stderr[-6000:]}"
                )
    return torch.load(saved, weights_only=True)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("cpu", marks=pytest.mark.interpreted),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def fused(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Fused:
    pytest.importorskip("triton")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        return Fused("cuda", fused_outputs("cuda", force=False))
    return Fused("cpu", _interpreted_outputs(tmp_path_factory))


def _grad_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32: the kernels' exp/log against torch's; 16 bits: one rounding of the same
    float32 gradient apart (assert_close's defaults for the dtype)."""
    return {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}


@pytest.mark.parametrize("norm", CE_NORMS)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_fused_soft_weighted_ce_matches_the_reference(fused: Fused, case: str, norm: str):
    logits, labels, reliability = _ce_inputs(case, fused.device)
    # the reference on the same values in float32: what the kernel computes in
    leaf = logits.float().requires_grad_()
    expected = reliability_weighted_ce(leaf, labels, reliability, norm)
    (expected * GRAD_SCALE).backward()
    loss = fused.outputs[f"ce/{case}/{norm}/loss"]
    grad = fused.outputs[f"ce/{case}/{norm}/grad"]
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    torch.testing.assert_close(loss, expected.detach().cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        grad, leaf.grad.to(logits.dtype).cpu(), **_grad_tolerance(logits.dtype)
    )


@pytest.mark.parametrize("norm", VARIANCE_NORMS)
@pytest.mark.parametrize("case", list(JITTER_CASES))
def test_fused_jitter_variance_matches_the_reference(fused: Fused, case: str, norm: str):
    deltas, jittered, boxes, image = _jitter_inputs(case, fused.device)
    expected = refined_jitter_variance(deltas, jittered, boxes, image, norm, **_coder(case))
    got = fused.outputs[f"jitter/{case}/{norm}"]
    assert got.shape == (len(boxes),)
    torch.testing.assert_close(got, expected.cpu(), rtol=1e-4, atol=1e-5)


def test_the_call_sites_fused_paths_match_their_reference_paths(fused: Fused):
    """jitter_variances (decode with the teacher's coder, images split, an empty one) and
    the student's soft-weighted loss, with kernels "auto" against "reference"."""
    out = fused.outputs
    for norm in VARIANCE_NORMS:
        expected = out[f"site/jitter/{norm}/reference"]
        assert expected.shape == (4,) and expected.min() > 0
        torch.testing.assert_close(out[f"site/jitter/{norm}/auto"], expected, rtol=1e-4, atol=1e-5)
    for norm in CE_NORMS:
        for part in ("loss", "grad"):
            torch.testing.assert_close(
                out[f"site/ce/{norm}/auto/{part}"],
                out[f"site/ce/{norm}/reference/{part}"],
                rtol=1e-5,
                atol=1e-7,
            )


def test_the_reference_runs_on_cpu_tensors_and_when_asked():
    cpu = torch.zeros(3)
    assert not use_triton(cpu, "auto")
    assert not use_triton(cpu, "reference")
    if torch.cuda.is_available():
        assert use_triton(cpu.cuda(), "auto") == triton_available()
        assert not use_triton(cpu.cuda(), "reference")
    with pytest.raises(ValueError, match="unknown kernels choice"):
        use_triton(cpu, "triton")  # type: ignore[arg-type]
    assert MethodConfig().kernels == "auto"
    with pytest.raises(ValueError, match="unknown method.kernels 'triton'"):
        MethodConfig(kernels="triton")  # type: ignore[arg-type]


def test_cpu_call_sites_under_auto_give_the_reference_numbers():
    """On CPU "auto" is the reference itself: the same numbers, bit for bit."""
    from softteacher.model.pseudo_labels import jitter_variances
    from softteacher.model.soft_teacher import soft_weighted_ce

    logits, labels, reliability = _ce_inputs("random", "cpu")
    for norm in CE_NORMS:
        cfg = MethodConfig(soft_weight_norm=norm)
        got = soft_weighted_ce(logits, labels, reliability, cfg)
        assert torch.equal(got, reliability_weighted_ce(logits, labels, reliability, norm))
    teacher, view = _call_site_inputs("cpu")
    cfg = MethodConfig(n_jitter=6)
    torch.manual_seed(5)
    auto = jitter_variances(teacher, view, cfg)
    torch.manual_seed(5)
    reference = jitter_variances(teacher, view, dataclasses.replace(cfg, kernels="reference"))
    assert all(torch.equal(a, r) for a, r in zip(auto, reference, strict=True))


if __name__ == "__main__":  # the interpreted run of ``fused`` (TRITON_INTERPRET=1 set)
    torch.set_num_threads(1)
    partial = f"{sys.argv[1]}.partial"
    torch.save(fused_outputs("cpu", force=True), partial)
    os.replace(partial, sys.argv[1])  # whole or absent for the workers waiting on it
