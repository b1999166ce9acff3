"""The CUDA checks of the pipeline in one run (issue #20): what a GPU machine runs once, with no network, in
under 8 minutes, writing one JSON record and one markdown table into ``--out``.

Parts, in order (each ``ok``, ``failed`` or ``skipped`` with its reason and seconds):

1. **environment**: Python, torch, CUDA and cuDNN versions, the GPU (name, memory), CPU threads,
   pydensecrf, the load average.
2. **pytest -m cuda**: the test suite's CUDA cases (a subprocess; its pass/fail/skip counts).
3. **CRF agreement**: the torch backend on the device against pydensecrf (the reference) on ``--images``
   PASCAL VOC 2012 val images (default 20) with degraded-ground-truth probabilities
   (``deeplab_v1.data.degraded``), 10 mean-field iterations at the release's parameters: the share of
   identical labels per image (and on CUDA, against the torch backend on the CPU). ``ok`` when every
   image agrees on at least 99 % of its pixels, the bar of the CPU agreement test
   (``tests/test_crf_torch.py``).
4. **CRF ms/image**: the torch backend batched (``tools/bench_pipeline.py``'s CRF row); on CUDA also its
   peak allocated memory against ``crf.backend_choice.torch_memory_mb``'s estimate (measured on CPU).
5. **search pairs/s**: ``crf.search.run_search`` in-process (``bench_pipeline``'s search row).
6. **network rows**: ``bench_pipeline``'s CUDA rows (LargeFOV train 321 / test 513, fp32 and bf16).

Without a GPU it runs 1, 3, 4 and 5 on the CPU (short: at most ``--cpu-images`` images) and says why
the others were skipped. A part that would end past the time budget (``--budget-s``, 450 s) is skipped
with that reason. Usage:

    python tools/gpu_check.py --out DIR [--images 20] [--voc-root VOC2012] [--quick] [--max-side S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from crf.atomic import atomic_write_json, atomic_write_text  # noqa: E402

#: The VOC folder beside the checkout that the tests use (tests/conftest.py).
DEFAULT_VOC = REPO.parent / "shared" / "data" / "VOCdevkit" / "VOC2012"
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False)"


class Skip(Exception):
    """A part that does not apply here; the message is the reason."""


def environment(device: str) -> dict[str, Any]:
    """The versions and devices the numbers were measured with."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import pydensecrf

        env["pydensecrf"] = getattr(pydensecrf, "__version__", "installed")
    except ImportError:
        env["pydensecrf"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpus=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return env


def run_pytest_cuda(device: str, timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda`` in a subprocess: its counts and its last lines."""
    if device != "cuda":
        raise Skip(f"{NO_CUDA}: every cuda test would skip")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(REPO / "tests")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail[-1] if tail else "")}
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m cuda exited {proc.returncode}: {tail[-1] if tail else ''}")
    return {"returncode": proc.returncode, "counts": counts, "tail": tail}


def load_inputs(voc: Path | None, count: int, max_side: int | None) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str]:
    """``count`` (name, RGB image, degraded-GT probabilities) of VOC val, or synthetic ones; the source."""
    from deeplab_v1.data.degraded import degraded_probs

    if voc is not None and (voc / "ImageSets" / "Segmentation" / "val.txt").is_file():
        from PIL import Image

        names = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]
        pairs = [(n, np.array(Image.open(voc / "JPEGImages" / f"{n}.jpg").convert("RGB")),
                  np.asarray(Image.open(voc / "SegmentationClass" / f"{n}.png"))) for n in names]
        source = f"VOC 2012 val, first {len(pairs)}"
    else:
        from bench_crf_search import synthetic

        pairs = [(f"synthetic_{k:03d}", *synthetic(k)) for k in range(count)]
        source = f"synthetic 500 x 375 (no VOC 2012 at {voc})"
    out = []
    for name, image, label in pairs:
        if max_side and max(image.shape[:2]) > max_side:
            import cv2

            f = max_side / max(image.shape[:2])
            size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        out.append((name, image, degraded_probs(label).astype(np.float32)))
    return out, source + (f", longer side at most {max_side}" if max_side else "")


def crf_agreement(device: str, inputs: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Labels of the torch backend on ``device`` against pydensecrf's (and CPU torch's on CUDA)."""
    from bench_pipeline import CRF_PARAMS

    from crf import CRFParams, dense_crf

    params = CRFParams(**CRF_PARAMS)
    per_image, worst, cpu_same = [], 1.0, []
    for name, image, probs in inputs:
        ours = dense_crf(image, probs, params, backend="torch", device=device).argmax(0)
        theirs = dense_crf(image, probs, params, backend="pydensecrf").argmax(0)
        agree = float((ours == theirs).mean())
        worst = min(worst, agree)
        row = {"image": name, "size": list(image.shape[:2]), "identical_to_pydensecrf": round(agree, 6)}
        if device != "cpu":
            cpu = dense_crf(image, probs, params, backend="torch", device="cpu").argmax(0)
            row["identical_to_cpu_torch"] = round(float((ours == cpu).mean()), 6)
            cpu_same.append(row["identical_to_cpu_torch"])
        per_image.append(row)
    result = {"images": len(inputs), "min_identical": round(worst, 6),
              "all_identical": sum(r["identical_to_pydensecrf"] == 1.0 for r in per_image), "per_image": per_image}
    if cpu_same:
        result["min_identical_to_cpu_torch"] = min(cpu_same)
    if worst < 0.99:
        raise AssertionError(f"torch on {device} agrees with pydensecrf on only {worst:.2%} of an image's pixels "
                             f"(bar: 99 %): {json.dumps(result)[:400]}")
    return result


def crf_speed(device: str, images: int, batch: int, size: tuple[int, int]) -> dict[str, Any]:
    """``bench_pipeline``'s CRF row: torch, batched, ms per image of ``size`` (H, W)."""
    from bench_pipeline import bench_crf

    from crf.backend_choice import torch_memory_mb

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    result = {"ms_per_image": round(bench_crf(images, "torch", device, batch, size), 1), "batch": batch,
              "images": images, "size": f"{size[1]}x{size[0]}", "labels": 21, "iterations": 10}
    if device == "cuda":  # the per-pixel estimate was measured as CPU peak RSS (crf.backend_choice)
        result["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        result["estimate_mib"] = round(torch_memory_mb(size[0] * size[1] * batch, 21), 1)
        result["estimate_covers_peak"] = result["estimate_mib"] >= result["peak_mib"]
    return result


def search_speed(device: str, configs: int, images: int, size: tuple[int, int]) -> dict[str, Any]:
    """``bench_pipeline``'s search row: (configuration, image) pairs/s, torch in-process."""
    from bench_pipeline import bench_search

    rate, pairs = bench_search(device, configs, images, size)
    return {"pairs_per_s": round(rate, 3), "pairs": pairs, "size": f"{size[1]}x{size[0]}",
            "layout": "torch in-process (workers: 1)"}


def network_rows(device: str, quick: bool) -> dict[str, Any]:
    if device != "cuda":
        raise Skip(f"{NO_CUDA}: the CUDA rows of tools/bench_pipeline.py")
    from bench_pipeline import forward_flops, network_rows as rows

    table = rows("cuda", 16, quick, forward_flops(321), forward_flops(513))
    return {"rows": [dict(zip(("device", "row", "precision", "batch", "throughput", "achieved / limit", "of limit"), r))
                     for r in table]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--images", type=int, default=20, help="VOC images of the CRF agreement on CUDA (20)")
    ap.add_argument("--cpu-images", type=int, default=2, help="... and without CUDA, on the CPU (2)")
    ap.add_argument("--voc-root", type=Path, default=DEFAULT_VOC, help="the VOC2012 folder (synthetic if absent)")
    ap.add_argument("--max-side", type=int, help="images of at most this longer side in the CRF parts (a quick run)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions in the speed parts")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip the parts that would start after it")
    args = ap.parse_args(argv)
    from crf.memory import reuse_freed_memory

    reuse_freed_memory()  # as a deeplab run does (crf.memory); results do not depend on it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    parts: list[dict[str, Any]] = []
    cuda = device == "cuda"
    count = args.images if cuda else min(args.images, args.cpu_images)

    def part(name: str, fn: Callable[[], dict[str, Any]], estimate_s: float = 0.0) -> None:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"part": name, "device": device}
        try:
            if t0 - start + estimate_s > args.budget_s:
                raise Skip(f"time budget: {t0 - start:.0f} s spent of {args.budget_s:.0f} s")
            entry.update(status="ok", result=fn())
        except Skip as exc:
            entry.update(status="skipped", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
            entry.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:600]}")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        parts.append(entry)
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s) {entry.get('reason', '')}", flush=True)

    part("environment", lambda: environment(device))
    part("pytest -m cuda", lambda: run_pytest_cuda(device, max(60.0, args.budget_s / 2)))
    def agreement() -> dict[str, Any]:
        inputs, source = load_inputs(args.voc_root, count, args.max_side)
        return {"source": source, **crf_agreement(device, inputs)}

    part("CRF agreement (torch vs pydensecrf)", agreement)
    quick = args.quick or not cuda
    batch = 8 if cuda else 1
    size = (375, 500)
    if args.max_side and args.max_side < 500:
        size = (max(8, round(375 * args.max_side / 500)), args.max_side)
    part("CRF ms/image (torch, batched)", lambda: crf_speed(device, batch * (1 if quick else 4), batch, size), 30.0)
    configs, images = ((24, 8) if quick else (48, 16)) if cuda else (2, 1)
    part("search pairs/s", lambda: search_speed(device, configs, images, size), 30.0)
    part("network rows (bench_pipeline, CUDA)", lambda: network_rows(device, quick), 120.0)
    record = {"device": device, "seconds": round(time.perf_counter() - start, 1), "parts": parts,
              "skipped": {p["part"]: p["reason"] for p in parts if p["status"] == "skipped"},
              "failed": [p["part"] for p in parts if p["status"] == "failed"]}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "gpu_check.json", record)
    atomic_write_text(args.out / "gpu_check.md", markdown(record))
    print(markdown(record))
    return 1 if record["failed"] else 0


def _summary(p: dict[str, Any]) -> str:
    r = p.get("result") or {}
    if p["status"] != "ok":
        return p.get("reason", "")
    if "counts" in r:
        return ", ".join(f"{n} {k}" for k, n in r["counts"].items())
    if "min_identical" in r:
        extra = f"; vs CPU torch: min {r['min_identical_to_cpu_torch']:.4%}" if "min_identical_to_cpu_torch" in r else ""
        return (f"{r['images']} images ({r['source']}): {r['all_identical']} with identical labels, "
                f"min {r['min_identical']:.4%} identical{extra}")
    if "ms_per_image" in r:
        memory = (f"; peak {r['peak_mib']} MiB, estimate {r['estimate_mib']} MiB "
                  f"({'covers' if r['estimate_covers_peak'] else 'BELOW'} the peak)") if "peak_mib" in r else ""
        return f"{r['ms_per_image']} ms/image (batch {r['batch']}, {r['size']}, {r['labels']} labels, 10 iterations){memory}"
    if "pairs_per_s" in r:
        return f"{r['pairs_per_s']} (configuration, image) pairs/s over {r['pairs']} pairs of {r['size']}, {r['layout']}"
    if "rows" in r:
        return "; ".join(f"{x['row']} {x['precision']}: {x['throughput']} ({x['of limit']} of limit)" for x in r["rows"])
    if "torch" in r:
        gpu = f", {r['gpu']} ({r['gpu_memory_gib']} GiB, CUDA {r['cuda']}, cuDNN {r['cudnn']})" if "gpu" in r else ""
        return f"Python {r['python']}, torch {r['torch']}, {r['cpus']} CPUs, pydensecrf {r['pydensecrf']}{gpu}"
    return json.dumps(r)[:200]


def markdown(record: dict[str, Any]) -> str:
    """The record as one markdown table (part, device, status, seconds, result or reason)."""
    lines = [f"gpu_check on {record['device']}, {record['seconds']} s", "",
             "| part | device | status | s | result |", "|---|---|---|---|---|"]
    for p in record["parts"]:
        text = _summary(p).replace("|", "/").replace("\n", " ")
        lines.append(f"| {p['part']} | {p['device']} | {p['status']} | {p['seconds']} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
