"""Where a run's code came from: the commit a sweep and each of its trials record."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(repo_dir: Path) -> str:
    """HEAD's commit, ``+dirty`` when tracked files changed (as ``git describe --dirty``);
    ``unknown`` outside a git checkout or without git (a Ray worker may have neither)."""

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
