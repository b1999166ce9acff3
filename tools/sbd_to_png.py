"""Convert the Semantic Boundaries Dataset's class annotations to ``SegmentationClassAug`` PNGs.

Usage::

    python tools/sbd_to_png.py SBD/dataset/cls OUT_DIR [--overwrite] [--no-progress]

Each ``<id>.mat`` (struct ``GTcls``, field ``Segmentation``) becomes ``OUT_DIR/<id>.png``, an 8-bit grayscale
PNG of class indices, the format of the ``SegmentationClassAug`` folder the release's ``train_aug`` list
points to. PNGs already present are skipped unless ``--overwrite``. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from deeplab_v1.data.io import DataError
    from deeplab_v1.data.sbd import convert_sbd
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deeplab_v1.data.io import DataError
    from deeplab_v1.data.sbd import convert_sbd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SBD cls/*.mat -> SegmentationClassAug grayscale PNGs")
    parser.add_argument("cls_dir", type=Path, help="SBD's dataset/cls folder")
    parser.add_argument("out_dir", type=Path, help="output folder (SegmentationClassAug)")
    parser.add_argument("--num-classes", type=int, default=21, help="valid labels are 0..N-1 (default 21)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite PNGs that exist already")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = convert_sbd(args.cls_dir, args.out_dir, num_classes=args.num_classes,
                              overwrite=args.overwrite, progress=not args.no_progress)
    except DataError as exc:
        print(f"sbd_to_png: error: {exc}", file=sys.stderr)
        return 2
    print(summary.line(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
