"""``deeplab convert``: any weights ``load_init`` accepts -> a checkpoint of a DeepLab v1 model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .caffemodel import CaffeModelError
from .errors import WeightsError
from .export import convert_weights

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``deeplab convert IN OUT --model NAME [--num-classes 21] [--reinit-fc8] [--allow-new LAYER]
    [--input-space torchvision|caffe] [--seed 0]``.

    Args:
        argv: the arguments after ``convert`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success (the report is printed), 1 when the weights do not fit or the file is unreadable
        (the error is printed to stderr). Argument errors exit through argparse (status 2).
    """
    from ..models.vgg import SPECS

    parser = argparse.ArgumentParser(
        prog="deeplab convert",
        description="Convert a .caffemodel (deeplab-public release or ImageNet VGG-16), an ImageNet VGG-16 "
        ".pth (PyTorch layout) or a checkpoint into a checkpoint of a DeepLab v1 model.",
    )
    parser.add_argument("src", type=Path, metavar="IN", help=".caffemodel or .pth to read")
    parser.add_argument("dst", type=Path, metavar="OUT", help="checkpoint (.pth) to write")
    parser.add_argument("--model", required=True, choices=sorted(SPECS), help="DeepLab v1 variant")
    parser.add_argument("--num-classes", type=int, default=21, help="classes of fc8 (default 21)")
    parser.add_argument("--reinit-fc8", action="store_true", help="start fc8 anew if its class count differs")
    parser.add_argument("--allow-new", action="append", default=[], metavar="LAYER",
                        help="a layer that may be missing from IN and starts new (repeatable; 'msc' = MSc branches)")
    parser.add_argument("--input-space", choices=["torchvision", "caffe"], default="torchvision",
                        help="input of an ImageNet VGG-16 .pth: torchvision (RGB 0..1, converted) or caffe (BGR 0..255)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layers that start new")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = convert_weights(
            args.src, args.dst, args.model, args.num_classes, reinit_fc8=args.reinit_fc8,
            allow_new=args.allow_new, input_space=args.input_space, seed=args.seed,
        )
    except (WeightsError, CaffeModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.format())
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
