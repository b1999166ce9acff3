"""Multiply-Adds, parameter counts and CPU inference time of the DeepLab v3 / v3+ models at 513x513.

Prints (Markdown) the Multiply-Adds of our models next to DeepLab v3+ Table 3 (ResNet-101) and Table 5
(Xception-65 with decoder and separable convolution), then parameters and CPU milliseconds per model.

Columns of the Multiply-Adds table (all in 1e9, FLOPs / 2 of ``torch.utils.flop_counter``, see
``deeplab_v1.models.flops``):

- ``ours``: our model as built, exact count (H x W positions per convolution);
- ``ours + s2b``: plus the positions TensorFlow's space-to-batch atrous convolution computes in padding
  (ceil(H / r) * r per side), the implementation the papers measured;
- ``TF layout + s2b`` (ResNet only): the same network with the TensorFlow ``resnet_v1_101_beta`` layout,
  where the stride-2 3x3 sits in the LAST unit of block1-block3 instead of the first unit of layer2-layer4,
  counted analytically here (stem, bottlenecks, shortcuts, ASPP) plus our decoder / classifier count.

Usage::

    python tools/bench_models.py                # Multiply-Adds table, parameters, CPU ms (2 repeats)
    python tools/bench_models.py --no-timing    # tables only (a few seconds)
    python tools/bench_models.py --out table.md # also write the Markdown (atomically)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplab_v1.models import build_model  # noqa: E402
from deeplab_v1.models.aspp import aspp_rates  # noqa: E402
from deeplab_v1.models.flops import count_multiply_adds  # noqa: E402

SIZE = 513

#: (table, description, model factory, encoder output_stride, paper Multiply-Adds in 1e9, ResNet layout check)
PAPER_ROWS: list[tuple[str, str, Callable[[], nn.Module], int, float, bool]] = [
    ("v3+ T3", "v3 ResNet-101 (deep stem), OS 16", partial(build_model, "deeplabv3-resnet101", root="3x3-conv", output_stride=16), 16, 81.02, True),
    ("v3+ T3", "v3 ResNet-101 (deep stem), OS 8", partial(build_model, "deeplabv3-resnet101", root="3x3-conv", output_stride=8), 8, 276.18, True),
    ("v3+ T3", "v3 ResNet-101 (deep stem), OS 32", partial(build_model, "deeplabv3-resnet101", root="3x3-conv", output_stride=32), 32, 52.43, True),
    ("v3+ T3", "v3+ ResNet-101 (deep stem) + decoder, OS 16", partial(build_model, "deeplabv3plus-resnet101", root="3x3-conv", output_stride=16), 16, 101.28, True),
    ("v3+ T3", "v3+ ResNet-101 (deep stem) + decoder, OS 8", partial(build_model, "deeplabv3plus-resnet101", root="3x3-conv", output_stride=8), 8, 297.92, True),
    ("v3+ T3", "v3+ ResNet-101 (deep stem) + decoder, OS 32", partial(build_model, "deeplabv3plus-resnet101", root="3x3-conv", output_stride=32), 32, 74.20, True),
    ("v3+ T5", "v3+ Xception-65 + decoder + SC, OS 16", partial(build_model, "deeplabv3plus-xception65", output_stride=16), 16, 54.17, False),
    ("v3+ T5", "v3+ Xception-65 + decoder + SC, OS 8", partial(build_model, "deeplabv3plus-xception65", output_stride=8), 8, 177.10, False),
]

#: Our other configurations (no paper number): the default 7x7 stem and the other named models.
EXTRA_ROWS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("deeplabv3-resnet101 (7x7 stem), OS 16", partial(build_model, "deeplabv3-resnet101")),
    ("deeplabv3-resnet101 (7x7 stem), OS 8", partial(build_model, "deeplabv3-resnet101", output_stride=8)),
    ("deeplabv3-resnet50 (7x7 stem), OS 16", partial(build_model, "deeplabv3-resnet50")),
    ("deeplabv3-cascade-resnet101 (block7, MG 1-2-1), OS 16", partial(build_model, "deeplabv3-cascade-resnet101")),
    ("deeplabv3plus-resnet101 (7x7 stem), OS 16", partial(build_model, "deeplabv3plus-resnet101")),
    ("deeplabv3plus-xception65 without SC, OS 16", partial(build_model, "deeplabv3plus-xception65", separable=False)),
]

TIMED_MODELS: list[tuple[str, dict]] = [
    ("deeplabv3-resnet50", {}),
    ("deeplabv3-resnet101", {}),
    ("deeplabv3-resnet101", {"output_stride": 8}),
    ("deeplabv3-cascade-resnet101", {}),
    ("deeplabv3plus-resnet101", {}),
    ("deeplabv3plus-xception65", {}),
]


def _conv_macs(k: int, cin: int, cout: int, h: int, rate: int = 1) -> int:
    """Multiply-Adds of a k x k convolution with an h x h output; a rate > 1 (stride 1) is counted with
    TensorFlow's space-to-batch padding (ceil(h / rate) * rate positions per side)."""
    side = math.ceil(h / rate) * rate if rate > 1 else h
    return k * k * cin * cout * side * side


def tf_layout_resnet101_macs(output_stride: int, multi_grid: tuple[int, int, int] = (1, 2, 4), size: int = SIZE) -> int:
    """Backbone + ASPP (no classifier) Multiply-Adds of the TensorFlow ``resnet_v1_101_beta`` layout with
    space-to-batch atrous convolution: deep stem 64/64/128, max pool, blocks of base depth 64/128/256/512
    with 3/4/23/3 units, the stride-2 3x3 in the last unit of block1-block3 (cancelled once the stride
    reaches ``output_stride``, after which the rate doubles), Multi-Grid on block4, shortcuts by 1x1
    convolution where the channels change (else subsampling, no Multiply-Adds); ASPP as
    ``deeplab_v1.models.aspp.ASPP``."""
    h = math.ceil(size / 2)
    total = _conv_macs(3, 3, 64, h) + _conv_macs(3, 64, 64, h) + _conv_macs(3, 64, 128, h)
    h, cin, stride, rate = math.ceil(h / 2), 128, 4, 1
    for depth, units, block_stride in ((64, 3, 2), (128, 4, 2), (256, 23, 2), (512, 3, 1)):
        for u in range(units):
            s = block_stride if u == units - 1 else 1
            unit_rate = rate * (multi_grid[u] if depth == 512 else 1)
            cancelled = s == 2 and stride >= output_stride
            if cancelled:
                s = 1
            out = math.ceil(h / s)
            if cin != 4 * depth:
                total += _conv_macs(1, cin, 4 * depth, out)
            total += _conv_macs(1, cin, depth, h) + _conv_macs(3, depth, depth, out, unit_rate) + _conv_macs(1, depth, 4 * depth, out)
            cin, h = 4 * depth, out
            if cancelled:
                rate *= 2
            elif s == 2:
                stride *= 2
    aspp = _conv_macs(1, 2048, 256, h) + sum(_conv_macs(3, 2048, 256, h, r) for r in aspp_rates(output_stride))
    aspp += 2048 * 256 + _conv_macs(1, 5 * 256, 256, h)  # image pooling 1x1 on one position, projection
    return total + aspp


def macs_table() -> list[str]:
    lines = [
        "| paper | configuration (513x513, 21 classes) | paper | ours | ours + s2b | TF layout + s2b | ours / paper "
        "| closest / paper |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for table, desc, factory, os_, paper, resnet in PAPER_ROWS:
        exact = count_multiply_adds(factory)
        s2b = count_multiply_adds(factory, atrous="space_to_batch")
        tf, closest = "-", s2b.billions
        if resnet:
            head = sum(v for k, v in exact.by_module.items() if k in ("classifier", "decoder"))
            closest = (tf_layout_resnet101_macs(os_) + head) / 1e9
            tf = f"{closest:.2f}"
        lines.append(f"| {table} | {desc} | {paper:.2f} | {exact.billions:.2f} | {s2b.billions:.2f} | {tf} | "
                     f"{exact.billions / paper:.3f} | {closest / paper:.3f} |")
    for desc, factory in EXTRA_ROWS:
        exact = count_multiply_adds(factory)
        s2b = count_multiply_adds(factory, atrous="space_to_batch")
        lines.append(f"| - | {desc} | - | {exact.billions:.2f} | {s2b.billions:.2f} | - | - | - |")
    return lines


def timing_table(repeats: int) -> list[str]:
    lines = [
        f"| model | options | logits for 513x513 | parameters (M) | CPU ms / image (median of {repeats}, "
        f"{torch.get_num_threads()} threads) |",
        "|---|---|---|---:|---:|",
    ]
    x = torch.zeros(1, 3, SIZE, SIZE)
    for name, opts in TIMED_MODELS:
        torch.manual_seed(0)
        model = build_model(name, **opts).eval()
        params = sum(p.numel() for p in model.parameters())
        times = []
        with torch.no_grad():
            out = model(x)  # warm-up (allocations, kernels)
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1000.0)
        opt = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults (OS 16)"
        lines.append(f"| {name} | {opt} | {tuple(out.shape[-2:])} | {params / 1e6:.2f} | {statistics.median(times):.0f} |")
        del model
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the CPU inference timing")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward passes per model (after 1 warm-up)")
    parser.add_argument("--out", type=Path, help="also write the Markdown here (atomic write)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    lines = ["## Multiply-Adds at 513x513 (1e9, FLOPs / 2)", "", *macs_table(), ""]
    print("\n".join(lines), flush=True)
    if not args.no_timing:
        timing = ["## Parameters and CPU inference time at 513x513 (eval, torch.no_grad, batch 1)", "",
                  *timing_table(args.repeats), ""]
        print("\n".join(timing), flush=True)
        lines += timing
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
