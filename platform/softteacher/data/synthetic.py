"""The embedded synthetic COCO-format set on disk: images rendered by ``scenes``, their COCO
annotation files, and a manifest that says which config made them.

A set is generated once into a data folder (under a lock, so concurrent sweeps share it)
and regenerated only when its config or the renderer's version changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from softteacher.config import SyntheticConfig
from softteacher.data.scenes import (
    SHAPES,
    SyntheticConfigError,
    render_synthetic_image,
    shape_names,
)

# Bump whenever the rendering in ``scenes`` changes, so that ``ensure_synthetic_coco``
# regenerates old sets.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
MANIFEST_NAME = "synthetic.json"


class SyntheticDirError(RuntimeError):
    """The output directory holds something that is not a synthetic set we may replace."""


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated set lives: COCO annotation files and their image folders."""

    root: Path
    train_ann: Path
    val_ann: Path
    train_images: Path
    val_images: Path

    @classmethod
    def at(cls, root: Path) -> SyntheticDataset:
        root = Path(root)
        return cls(
            root=root,
            train_ann=root / "instances_train.json",
            val_ann=root / "instances_val.json",
            train_images=root / "train",
            val_images=root / "val",
        )

    def ann_file(self, split: str) -> Path:
        return {"train": self.train_ann, "val": self.val_ann}[split]

    def image_dir(self, split: str) -> Path:
        return {"train": self.train_images, "val": self.val_images}[split]


def categories(cfg: SyntheticConfig) -> list[dict]:
    return [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(shape_names(cfg.num_classes))
    ]


def validate_config(cfg: SyntheticConfig) -> None:
    """Reject configs that would hang placement or make empty classes, before any work."""
    problems = []
    if not 1 <= cfg.num_classes <= len(SHAPES):
        problems.append(f"num_classes={cfg.num_classes} must be in 1..{len(SHAPES)}")
    if not 32 <= cfg.min_size <= cfg.max_size:
        problems.append(f"need 32 <= min_size <= max_size (got {cfg.min_size}, {cfg.max_size})")
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        problems.append(
            f"need 1 <= min_objects <= max_objects (got {cfg.min_objects}, {cfg.max_objects})"
        )
    if not 0 < cfg.min_object_frac <= cfg.max_object_frac <= 1:
        problems.append(
            "need 0 < min_object_frac <= max_object_frac <= 1 "
            f"(got {cfg.min_object_frac}, {cfg.max_object_frac})"
        )
    if cfg.num_train < 1 or cfg.num_val < 1:
        problems.append(f"need num_train, num_val >= 1 (got {cfg.num_train}, {cfg.num_val})")
    if problems:
        raise SyntheticConfigError("invalid SyntheticConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------- writing


def write_image(cfg: SyntheticConfig, split: str, index: int, image_dir: Path) -> tuple:
    """Render and save one image; return ``(width, height, [(category_id, bbox), ...])``."""
    rendered = render_synthetic_image(cfg, split, index)
    buffer = io.BytesIO()
    Image.fromarray(rendered.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    (image_dir / _file_name(index)).write_bytes(buffer.getvalue())
    height, width = rendered.image.shape[:2]
    return width, height, [(o.category_id, o.bbox) for o in rendered.objects]


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def generate_synthetic_coco(out_dir: Path, cfg: SyntheticConfig) -> SyntheticDataset:
    """Write the set into ``out_dir`` (new or empty); ``synthetic.json`` is written last.

    One process is enough (about 400 images/s at the default size on this machine's CPU);
    the per-image seeds would let a pool render the same bytes if that ever changes.
    Prefer ``ensure_synthetic_coco``, which never leaves a half-written set behind.
    """
    validate_config(cfg)
    dataset = SyntheticDataset.at(Path(out_dir))
    if dataset.root.exists() and any(dataset.root.iterdir()):
        raise SyntheticDirError(
            f"{dataset.root} is not empty; generate into a new folder, or use "
            "ensure_synthetic_coco to replace an older set"
        )
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        image_dir = dataset.image_dir(split)
        image_dir.mkdir(parents=True, exist_ok=True)
        per_image = [write_image(cfg, split, i, image_dir) for i in range(count)]
        _write_annotations(dataset.ann_file(split), cfg, per_image)
    manifest = {"version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg)}
    (dataset.root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dataset


def _write_annotations(ann_file: Path, cfg: SyntheticConfig, per_image: list) -> None:
    images, annotations = [], []
    for index, (width, height, objects) in enumerate(per_image):
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": _file_name(index), "width": width, "height": height}
        )
        for category_id, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    content = {
        "info": {"description": "softteacher synthetic shapes", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories(cfg),
    }
    ann_file.write_text(json.dumps(content))


# --------------------------------------------------------------------------- reuse


def existing_synthetic_coco(out_dir: Path, cfg: SyntheticConfig) -> SyntheticDataset | None:
    """The set in ``out_dir`` if it is complete and was made from ``cfg`` by this version."""
    dataset = SyntheticDataset.at(Path(out_dir))
    try:
        manifest = json.loads((dataset.root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest != {"version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg)}:
        return None
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        if not dataset.ann_file(split).is_file() or not dataset.image_dir(split).is_dir():
            return None
        if sum(1 for _ in os.scandir(dataset.image_dir(split))) != count:
            return None
    return dataset


def ensure_synthetic_coco(
    out_dir: Path, cfg: SyntheticConfig, *, force: bool = False
) -> SyntheticDataset:
    """Reuse the set in ``out_dir`` if it matches ``cfg``; otherwise generate it atomically.

    The set is built in a temporary sibling folder and renamed into place, so a killed run
    leaves either the old set or none, never a partial one that looks complete. A lock file
    beside ``out_dir`` makes concurrent callers (e.g. several Ray workers) wait for one
    generation instead of racing. ``force`` regenerates even a matching set.
    """
    out_dir = Path(out_dir)
    found = None if force else existing_synthetic_coco(out_dir, cfg)
    if found is not None:
        return found
    validate_config(cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        found = None if force else existing_synthetic_coco(out_dir, cfg)
        if found is not None:  # another process finished it while we waited
            return found
        if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
            raise SyntheticDirError(
                f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to replace it: "
                "choose another --out folder or empty this one"
            )
        # Under the lock, any staging folder is left over from a killed run.
        for stale in out_dir.parent.glob(f".{out_dir.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
        try:
            generate_synthetic_coco(staging, cfg)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return SyntheticDataset.at(out_dir)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
