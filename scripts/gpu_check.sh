#!/usr/bin/env bash
# The checks that need a GPU, for a machine with one: the fused Triton kernels compiled
# (not interpreted) against their plain-torch references, then the training-step benchmark
# on CUDA for both detectors at the paper's size (short side 800), without and with bf16
# autocast, with the Triton kernels (method.kernels=auto) and with the plain-torch reference.
#
#   scripts/gpu_check.sh            # RESULTS_DIR=... for the tables (default: a fresh temp folder)
#
# It runs on the project's venv when there is one, else on the machine's own python3: a GPU
# image with PyTorch and Triton but neither Ray, MLflow nor pycocotools is enough (the kernel
# tests and the step benchmarks import none of them; conftest.py, which starts Ray clusters,
# is left out), and the project itself is installed without its dependencies into a temp
# folder when that Python cannot import it. Each stage prints the time it starts at.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d -t gpu-check-XXXXXX)}"
stage() { echo "== $(date +%T) $*"; }

nvidia-smi -L
if ! "$PYTHON" -c "import softteacher.kernels" 2>/dev/null; then
    site="$(mktemp -d -t softteacher-site-XXXXXX)"
    stage "installing the project (no dependencies) into $site"
    "$PYTHON" -m pip install --quiet --no-deps --no-index --no-build-isolation --target "$site" .
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the CUDA cases of the kernel tests skip without a device: make that a failure here
"$PYTHON" -c "
import torch, torchvision, triton
assert torch.cuda.is_available(), 'torch sees no CUDA device'
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, '
      f'triton {triton.__version__}, {torch.cuda.get_device_name()}')
"

# compiled on CUDA; their interpreted CPU cases are CI's (Triton 3.6's interpreter fails
# under numpy >= 2.4, where CI's Triton 3.8 runs them)
stage "kernel tests"
"$PYTHON" -m pytest -q --noconftest -p no:cacheprovider -m "not interpreted" \
    tests/test_kernels_triton.py tests/test_kernels.py

stage "step benchmark; tables under $RESULTS_DIR"
"$PYTHON" experiments/benchmark.py --results-dir "$RESULTS_DIR" speed \
    --detectors slim,r50-fpn --sizes 800 --amp off,bf16 --kernels auto,reference
stage "done"
