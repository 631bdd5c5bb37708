"""Write the STAC folds of a COCO training file: one labeled and one unlabeled file each.

    python experiments/prepare_folds.py --ann data/coco/annotations/instances_train2017.json \
        --percents 1,5,10 --folds 1,2,3,4,5 --out data/coco/annotations/semi_supervised
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softteacher.data.coco import CocoFormatError
from softteacher.data.folds import DEFAULT_STEM, FoldError, write_folds


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of {kind.__name__}s"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ann", type=Path, required=True, help="COCO instances file to split")
    parser.add_argument("--percents", type=lambda t: _numbers(t, float), default=[1.0, 5.0, 10.0],
                        help="labeled percents, comma-separated (default 1,5,10)")
    parser.add_argument("--folds", type=lambda t: _numbers(t, int), default=[1, 2, 3, 4, 5],
                        help="fold numbers, comma-separated (default 1,2,3,4,5)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fold files")
    parser.add_argument("--stem", default=DEFAULT_STEM,
                        help=f"file name stem (default {DEFAULT_STEM})")
    args = parser.parse_args(argv)
    try:
        results = write_folds(args.ann, args.out, args.percents, args.folds, stem=args.stem)
    except (CocoFormatError, FoldError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for files in results:
        for path, images, boxes in (
            (files.labeled, files.num_labeled, files.labeled_annotations),
            (files.unlabeled, files.num_unlabeled, files.unlabeled_annotations),
        ):
            status = "wrote" if path in files.written else "unchanged"
            print(f"{status} {path} ({images} images, {boxes} annotations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
