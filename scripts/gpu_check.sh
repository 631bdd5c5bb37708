#!/usr/bin/env bash
# The checks that need a GPU, for a machine with one: the fused Triton kernels compiled
# (not interpreted) against their plain-torch references, then the training-step benchmark
# on CUDA for both detectors, without and with bf16 autocast.
#
#   scripts/gpu_check.sh                    # PYTHON=... for another interpreter than .venv's
#
# The step benchmark times the Soft Teacher step with the Triton kernels (method.kernels=auto)
# and with the plain-torch reference; its tables go to RESULTS_DIR (a fresh temporary folder
# unless given), not to experiments/results/.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d -t gpu-check-XXXXXX)}"

nvidia-smi -L
# the CUDA cases of the kernel tests skip without a device: make that a failure here
"$PYTHON" -c "
import torch, triton
assert torch.cuda.is_available(), 'torch sees no CUDA device'
print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')
"

echo "== kernel tests (cpu: interpreted, cuda: compiled)"
"$PYTHON" -m pytest -q tests/test_kernels_triton.py tests/test_kernels.py

echo "== step benchmark; tables under $RESULTS_DIR"
"$PYTHON" experiments/benchmark.py --results-dir "$RESULTS_DIR" speed \
    --detectors slim,r50-fpn --amp off,bf16 --kernels auto,reference
