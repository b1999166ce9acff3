"""Size of the test stage's score cache per image, for each v1 variant's test net (the MSc nets keep their
full-resolution ``fc_fusion`` sum, the others the stride-8 fc8 map).

    python tools/score_cache_size.py VOCdevkit/VOC2012 [--images 4] [--models deeplab-largefov deeplab-msc-largefov]

Runs the test net (``engine.inference.predict``) on the first val images with seeded random weights (the
MSc branches He-initialised so that their fine-resolution scores are not the near-constant ones of their
std-0.001 fillers: a trained net's are not either), writes each ``ScoreMap`` as the test stage does and
prints a table of the raw float16 and the compressed file size in MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2  # noqa: E402
import torch  # noqa: E402

from deeplab_v1.engine.inference import predict  # noqa: E402
from deeplab_v1.models import build_model  # noqa: E402
from deeplab_v1.models.vgg import SPECS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("voc", type=Path, help="VOC2012 folder (JPEGImages, ImageSets/Segmentation/val.txt)")
    parser.add_argument("--images", type=int, default=4, help="first N val images (default 4)")
    parser.add_argument("--models", nargs="+", default=["deeplab-largefov", "deeplab-msc-largefov"], choices=sorted(SPECS))
    args = parser.parse_args(argv)
    ids = (args.voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[: args.images]
    print(f"load average {os.getloadavg()[0]:.2f}; {len(ids)} VOC val images")
    print("| model | test stride | scores per image | raw float16 MB | file MB (npz) |")
    print("|---|---:|---|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name).eval()
        for layer in model.msc_layer_names():
            torch.nn.init.kaiming_normal_(model.caffe_layer(layer).weight)
        raw, files, shape = [], [], None
        for i in ids:
            image = cv2.imread(str(args.voc / "JPEGImages" / f"{i}.jpg"), cv2.IMREAD_COLOR)
            with torch.no_grad():
                sm = predict(model, image, size=SPECS[name].test_size)
            with tempfile.TemporaryDirectory() as d:
                sm.save(Path(d) / "s.npz")
                files.append(os.path.getsize(Path(d) / "s.npz") / 1e6)
            raw.append(sm.scores.size * 2 / 1e6)
            shape = sm.scores.shape
        print(f"| {name} | {sm.stride} | {shape} (last) | {sum(raw) / len(raw):.2f} | {sum(files) / len(files):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
