"""Generate the synthetic COCO-format shapes set (reused when it already matches).

    python experiments/make_synthetic.py --out data/synthetic [--num-train 2000 --num-val 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from softteacher.config import SyntheticConfig
from softteacher.data.synthetic import (
    SyntheticConfigError,
    SyntheticDirError,
    ensure_synthetic_coco,
    existing_synthetic_coco,
)


def main(argv: list[str] | None = None) -> int:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the set")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="regenerate even a matching set")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(
        defaults, num_train=args.num_train, num_val=args.num_val, seed=args.seed
    )
    if not args.force and existing_synthetic_coco(args.out, cfg) is not None:
        print(f"reused {args.out}: it already holds this configuration (--force regenerates)")
        return 0
    start = time.perf_counter()
    try:
        dataset = ensure_synthetic_coco(args.out, cfg, force=True)
    except (SyntheticConfigError, SyntheticDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    images = cfg.num_train + cfg.num_val
    print(f"wrote {images} images to {dataset.root} in {seconds:.1f} s "
          f"({images / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
