"""Where a run came from: the commit a sweep and each of its trials record, and the CPU each
worker trained on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# the package's own folder: in a source checkout (an editable install), git finds the
# checkout from here; anywhere else there is no commit to name
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def git_commit(repo_dir: Path = PACKAGE_DIR) -> str:
    """The commit of the code that runs: HEAD's commit, ``+dirty`` when tracked files
    changed (as ``git describe --dirty``); ``unknown`` outside a git checkout or without git
    (a Ray worker may have neither)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def cpu_description(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model and the vector ISA torch's CPU kernels run with (``AVX2``,
    ``AVX512``, ...). A run is bit-reproducible on one machine; CPUs that differ in either
    pick other kernels (oneDNN chooses by ISA), whose rounding differs, and training
    amplifies that into different weights, so two runs' machines are worth comparing first."""
    model = "unknown CPU"
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"
