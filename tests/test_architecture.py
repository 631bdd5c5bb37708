"""Imports point one way: config -> data -> model -> train -> eval -> run -> tune, with
track beside them (it may be used by run and tune, and uses only config and names); kernels import
nothing of the package. An upward import or a cycle between subpackages fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "softteacher"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"
LAYERS = {
    "config": 0,
    "overrides": 0,
    "presets": 0,
    "names": 0,
    "files": 0,
    "kernels": 1,
    "data": 2,
    "model": 3,
    "train": 4,
    "eval": 5,
    "run": 6,
    "preflight": 7,
    "tune": 7,
    "bench": 7,
}
# track sits beside the stages: anything at run level or above may log and tabulate.
TRACK_USERS_FROM = LAYERS["run"]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "softteacher" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {stage for stage in map(_stage, found) if stage}


def _sources() -> list[tuple[str, Path]]:
    files = [
        (p.relative_to(PACKAGE).parts[0].removesuffix(".py"), p) for p in PACKAGE.rglob("*.py")
    ]
    files += [("kernels", p) for p in KERNELS.glob("*.py")]
    return [(stage, path) for stage, path in files if stage != "__init__"]


@pytest.mark.parametrize(("stage", "path"), _sources(), ids=lambda v: str(v))
def test_imports_point_down_the_stages(stage: str, path: Path) -> None:
    for imported in _imports(path) - {stage}:
        if imported == "track":
            assert stage == "track" or LAYERS[stage] >= TRACK_USERS_FROM, (
                f"{path.name} ({stage}) imports softteacher.track: only run and tune log"
            )
        elif stage == "track":
            assert imported in ("config", "names", "files"), (
                f"{path.name} (track) imports softteacher.{imported}"
            )
        else:
            assert LAYERS[imported] <= LAYERS[stage], (
                f"{path.relative_to(PACKAGE.parent)} ({stage}) imports softteacher.{imported}, "
                "a later stage"
            )
