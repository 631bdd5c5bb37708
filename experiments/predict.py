"""Draw a trained run's detections (class, score) on a folder of images (the paper's Figure 4).

    python experiments/predict.py --model models:/m-<id> --images DIR --out DIR
    python experiments/predict.py --run RUN_ID --images val/ --out out/ --ann instances_val.json

``--model`` is a sweep trial's final teacher, logged as an MLflow model (find the best of a
sweep with ``mlflow.search_logged_models``, ordered by ``metrics.final/teacher/AP``).
``--run`` is a sweep trial's MLflow run: its ``summary.json`` artifact names the final Ray
checkpoint (teacher and student) and its ``config.json`` the detector to rebuild. One
``<image name>.png`` is written to OUT per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softteacher.data.coco import CocoFormatError
from softteacher.data.images import CorruptImageError
from softteacher.eval.inference import (
    RunArtifactError,
    load_detector,
    load_logged_model,
    run_checkpoint,
)
from softteacher.eval.overlays import (
    ClassNamesError,
    ImageFolderError,
    class_names_for,
    predict_folder,
)

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a logged model's URI, models:/m-<id>")
    source.add_argument("--run", help="MLflow run id of a sweep trial (its Ray checkpoint)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="folder for the overlays")
    parser.add_argument(
        "--tracking-uri", default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else experiments/results/mlflow.db)",
    )
    parser.add_argument("--min-score", type=float, default=0.5, help="draw detections from here")
    parser.add_argument(
        "--weights", choices=("teacher", "student"), default="teacher",
        help="with --run: which of the checkpoint's two detectors (a logged model is a teacher)",
    )
    parser.add_argument(
        "--ann", type=Path, default=None,
        help="a COCO file whose categories name the classes (default: 'class k')",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="the Ray checkpoint directory, when it moved since the run logged it",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from softteacher.track.stores import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(DEFAULT_RESULTS_DIR)
    if args.model and (args.weights != "teacher" or args.checkpoint):
        print("error: --weights student and --checkpoint go with --run; a logged model "
              "holds the teacher alone", file=sys.stderr)
        return 2
    try:
        if args.model:
            model, config = load_logged_model(uri, args.model)
        else:
            run = run_checkpoint(uri, args.run)
            config = run.config
            model = load_detector(args.checkpoint or run.checkpoint_dir, config, args.weights)
        names = class_names_for(config.detector.num_classes, args.ann)
        written = predict_folder(
            model, args.images, args.out, config.augment, names, min_score=args.min_score
        )
    except (
        RunArtifactError, ImageFolderError, ClassNamesError, CocoFormatError, CorruptImageError
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    source = f"model {args.model}" if args.model else f"the {args.weights} of run {args.run}"
    print(f"{len(written)} overlays of {source} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
