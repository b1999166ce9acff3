"""``deeplab predict``: segment any JPEG/PNG with a checkpoint, outside of any experiment or list.

    deeplab predict IMAGE... --weights CK.pth [--model NAME] [--crf] [--params w1=5,sigma_alpha=50]
                    --out DIR [--device cpu|cuda] [--batch-size N]

For every image, of any size, it writes (the run folder's names, ``layout.RunLayout``):

- ``DIR/dcnn/<stem>.png``: the DCNN's labels (arg-max of the test net's scores upsampled as Caffe's
  INTERP, ``engine.inference``), a palette PNG of the image's size in the colours of the checkpoint's run
  (``data.palette`` of ``<run>/config.yaml`` when the checkpoint is ``<run>/checkpoints/*.pth``), else VOC's;
- ``DIR/crf/<stem>.png`` with ``--crf``: after the fully connected CRF (``crf.dense_crf``), with the
  parameters of the checkpoint's run -- its fitted CRF (``<run>/crf_search/learned.json``: kernel weights and
  label compatibility, unless the run's ``crf.use_learned`` is false), else the search's best
  (``<run>/crf_search/best.json``) -- else the release's LargeFOV values, then ``--params`` on top;
- ``DIR/overlay/<stem>.png``: image | DCNN | DCNN-CRF side by side, the labels over the image;
- ``DIR/predict.json``: the checkpoint, model, CRF parameters and where they came from, and per image the
  CRF backend that ran, on which device, why, and the memory budget it was chosen for.

The CRF backend is chosen per image before any inference (``crf.backend_choice.resolve_backend``): with
``auto`` (the default) the torch backend where the image fits the memory budget (``--crf-memory-mb``;
default ``crf.backend_choice.default_memory_mb``: on CPU half the memory, at most 4096 MiB, on CUDA half
the free device memory), else pydensecrf, whose working memory per pixel is a fraction of torch's (a
3000 x 2000 photo needs ~15 GB in torch). The choice and its reason are printed and recorded (issue #21
item 8).

Images are checked (decoded) and the checkpoint is loaded into the model before any inference, so a
missing image, a file that is not an image or a checkpoint of another architecture stops at once with
one line. Images whose padded test size agrees run as one batch (``engine.inference.predict_batch``: the
padding is the test net's, so a batch gives the same scores as one image at a time).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from crf import CRFParams, dense_crf
from crf import inputs as crf_inputs
from crf.backend_choice import BackendChoice, resolve_backend, torch_memory_mb
from crf.params import RELEASE_LARGEFOV

from .atomic import atomic_write_bytes, atomic_write_json
from .config import DataConfig
from .data.layouts import png_palette
from .data.io import read_image, write_label
from .engine.inference import ScoreMap, label_from_scores, padded_size, predict_batch
from .errors import DeepLabError
from .figures import blend, side_by_side
from .layout import RunLayout
from .models import MODEL_NAMES, build_model
from .models.crf_rnn import crf_rnn_options
from .models.vgg import SPECS
from .weights.checkpoint import CheckpointError, checkpoint_state_dict, load_checkpoint

__all__ = ["PredictError", "Predictor", "load_predictor", "parse_params", "crf_params_for", "crf_for", "run_palette",
           "crf_choice", "predict_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: The CRF backends ``--crf-backend`` takes (``crf.inputs.BACKEND_CHOICES``; ``auto``: torch when it fits).
CRF_BACKENDS: tuple[str, ...] = tuple(crf_inputs.BACKEND_CHOICES)


class PredictError(DeepLabError, ValueError):
    """Bad input to ``deeplab predict``: an image, a checkpoint, a parameter or a device it cannot use.
    The message names the file or the option."""


@dataclass
class Predictor:
    """A model ready for inference: in eval mode on ``device``, with its name and test padding size."""

    model: torch.nn.Module
    name: str
    num_classes: int
    size: int
    device: torch.device
    checkpoint: Path


def resolve_device(device: Optional[str]) -> torch.device:
    """``cpu``, ``cuda``/``cuda:N``, or None: CUDA when available, else the CPU.

    Raises:
        PredictError: CUDA was asked for and is not available.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


def load_predictor(weights: str | Path, *, model: Optional[str] = None, num_classes: Optional[int] = None,
                   device: Optional[str] = None, size: Optional[int] = None) -> Predictor:
    """Build the network a checkpoint of ours holds and load it.

    Args:
        weights: a checkpoint of ours (``final.pth``, ``iter_<N>.pth``, ``deeplab convert``'s output).
        model: a ``MODEL_NAMES`` name; needed only when the checkpoint does not record its model, and
            must agree with it when it does.
        num_classes: classes of fc8 (default: the checkpoint's record, else 21).
        device: see :func:`resolve_device`.
        size: the test padding in pixels (default: the release's for v1 -- 513, 514 for ``deeplab`` --
            else 513).

    Raises:
        PredictError: no model name, a name that disagrees with the checkpoint's, or a checkpoint whose
            layers or shapes do not fit the model (another architecture); CheckpointError (a
            DeepLabError): the file is missing or not a checkpoint of ours.
    """
    weights = Path(weights)
    if weights.is_dir():
        raise PredictError(f"--weights {weights}: a folder, not a checkpoint; pass the .pth file (e.g. "
                           f"{weights / 'checkpoints' / 'final.pth'})")
    try:
        ck = load_checkpoint(weights)
    except CheckpointError as exc:  # the file names itself; say which argument gave it
        raise CheckpointError(f"--weights {exc}") from exc
    recorded = ck.get("model")
    if model is not None and recorded is not None and model != recorded:
        raise PredictError(f"{weights}: a checkpoint of model {recorded!r}, but --model {model} was given")
    name = model or recorded
    if name is None:
        raise PredictError(f"{weights}: the checkpoint does not record its model; pass --model "
                           f"({', '.join(MODEL_NAMES)})")
    if name not in MODEL_NAMES:
        raise PredictError(f"{weights}: unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    n = int(num_classes or ck.get("num_classes") or 21)
    dev = resolve_device(device)
    net = build_model(name, n, crf_rnn=crf_rnn_options(ck.get("crf_rnn")))  # CRF-as-RNN: the CRF layer too
    state = checkpoint_state_dict(ck)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in
                 (("missing layers", missing), ("unexpected layers", unexpected), ("shapes differ for", wrong)) if keys]
        raise PredictError(f"{weights}: does not fit model {name!r} with {n} classes ({'; '.join(parts)}); "
                           "a checkpoint of another architecture? (--model, --num-classes)")
    net.load_state_dict(state)
    spec = SPECS.get(name)
    test_size = size or (spec.test_size if spec is not None else 513)
    return Predictor(net.to(dev).eval(), name, n, test_size, dev, weights)


def parse_params(text: Optional[str], base: CRFParams) -> CRFParams:
    """``w1=5,sigma_alpha=50`` on top of ``base``.

    Raises:
        PredictError: a malformed item, an unknown name or an invalid value (the message names it).
    """
    if not text:
        return base
    values = base.to_dict()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in values:
            raise PredictError(f"--params: {item!r} is not NAME=VALUE with NAME one of {', '.join(values)}")
        try:
            values[key] = int(value) if key == "iterations" else float(value)
        except ValueError:
            raise PredictError(f"--params: {key}={value!r} is not a number") from None
    try:
        return CRFParams.from_dict(values)
    except ValueError as exc:
        raise PredictError(f"--params: {exc}") from exc


def checkpoint_run(weights: Path) -> Optional[RunLayout]:
    """The run folder of a checkpoint at ``<run>/checkpoints/<file>.pth``, else None."""
    folder = weights.resolve().parent
    return RunLayout(folder.parent) if folder.name == "checkpoints" else None


def run_config(run: Optional[RunLayout]) -> dict:
    """The resolved configuration a run folder recorded (``config.yaml``), or {} (none, or unreadable)."""
    try:
        config = yaml.safe_load(run.config.read_text(encoding="utf-8")) if run is not None else {}
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def run_palette(weights: Path) -> tuple[Optional[np.ndarray], str]:
    """The label colours of a checkpoint's run (``data.palette`` of its ``config.yaml``, Cityscapes' for its
    layout; ``data.layouts.png_palette``) and where they come from; (None, "VOC") for VOC's colour map."""
    run = checkpoint_run(weights)
    data = run_config(run).get("data") or {}
    try:
        colours = png_palette(DataConfig(layout=data.get("layout", "voc"), palette=data.get("palette")))
    except (TypeError, ValueError):  # a damaged config.yaml: VOC's colours, and the record says so
        colours = None
    return colours, "VOC" if colours is None else f"data.palette of {run.config}"


def crf_for(weights: Path, params: Optional[str] = None) -> tuple[CRFParams, str, Optional[np.ndarray]]:
    """The CRF for a checkpoint: parameters, where they come from and the ``(C, C)`` label compatibility (None:
    Potts). A checkpoint in a run folder takes the run's fitted CRF (``crf_search/learned.json``, unless the
    run's ``crf.use_learned`` is false), else its search's best; otherwise the release's LargeFOV values; then
    ``params`` on top (the compatibility kept).

    Raises:
        PredictError: bad ``params`` (named).
    """
    run = checkpoint_run(weights)
    if run is not None and (run_config(run).get("crf") or {}).get("use_learned", True):
        try:
            learned = run.learned_crf()
        except ValueError:  # a damaged learned.json: the search's best, and the origin says which
            learned = None
        if learned is not None:
            return parse_params(params, learned[0]), (f"{run.crf_search / 'learned.json'} (the run's fitted CRF)"
                                                      + (" with --params" if params else "")), learned[1]
    return (*crf_params_for(weights, params), None)


def crf_params_for(weights: Path, params: Optional[str] = None) -> tuple[CRFParams, str]:
    """The CRF parameters for a checkpoint and where they come from: the search's best when the
    checkpoint lies in a run folder (``<run>/checkpoints/<file>.pth``) with ``crf_search/best.json``,
    else the release's LargeFOV values (``crf.params.RELEASE_LARGEFOV``); ``params`` on top
    (:func:`crf_for` also takes the run's fitted CRF)."""
    best = None
    run = checkpoint_run(weights)
    if run is not None:
        try:
            best = run.best_params()
        except (ValueError, KeyError):  # a damaged best.json: fall back, and say so
            best = None
        origin = f"{run.best} (the run's CRF search)" if best is not None else ""
    if best is None:
        best, origin = RELEASE_LARGEFOV, "the release's LargeFOV values"
    out = parse_params(params, best)
    return out, origin + (" with --params" if params else "")


def check_images(paths: Sequence[str | Path]) -> dict[Path, tuple[int, int]]:
    """Every image exists, is a JPEG/PNG that decodes, and has a stem of its own (the output names).

    Returns:
        Each image's (height, width) in pixels, in the given order.

    Raises:
        PredictError: no image; two images with the same file stem; DataError (a DeepLabError): a missing
            or undecodable file (all checked before any inference).
    """
    if not paths:
        raise PredictError("no image given")
    sizes: dict[Path, tuple[int, int]] = {}
    seen: dict[str, Path] = {}
    for p in (Path(p) for p in paths):
        if p.is_dir():
            raise PredictError(f"{p}: a folder, not an image; pass the image files, e.g. {p / '*.jpg'} "
                               "(the shell expands the pattern)")
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
            raise PredictError(f"{p}: not a JPEG or PNG file (expected {', '.join(IMAGE_SUFFIXES)})")
        sizes[p] = read_image(p).shape[:2]  # DataError names the file
        if p.stem in seen and seen[p.stem] != p:
            raise PredictError(f"{p} and {seen[p.stem]} share the name {p.stem!r}; their outputs would collide")
        seen[p.stem] = p
    return sizes


def _batches(paths: list[Path], images: dict[Path, tuple[int, int]], size: int, multiple: int,
             batch_size: int) -> Iterable[list[Path]]:
    """Paths grouped by padded test size (so a batch pads no image more than alone), ``batch_size`` at most."""
    groups: dict[int, list[Path]] = {}
    for p in paths:
        groups.setdefault(padded_size(*images[p], size, multiple), []).append(p)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def predict_images(paths: Sequence[str | Path], weights: str | Path, out: str | Path, *, model: Optional[str] = None,
                   num_classes: Optional[int] = None, use_crf: bool = False, params: Optional[str] = None,
                   device: Optional[str] = None, crf_backend: Optional[str] = None, batch_size: int = 4,
                   size: Optional[int] = None, progress: bool = True, crf_memory_mb: Optional[float] = None,
                   log: Callable[[str], None] = print) -> dict:
    """Segment images (see the module docstring for what is written).

    Args:
        paths: JPEG/PNG files of any size.
        weights: a checkpoint of ours.
        out: the output folder (created).
        model, num_classes, size: see :func:`load_predictor`.
        use_crf: also run the fully connected CRF.
        params: ``--params`` text, e.g. ``w1=5,sigma_alpha=50``.
        device: ``cpu``, ``cuda`` or None (CUDA when available).
        crf_backend: one of ``CRF_BACKENDS`` (default ``auto``: the torch backend when it fits the
            memory budget, else pydensecrf; ``crf.backend_choice``).
        batch_size: images per forward pass (>= 1).
        crf_memory_mb: the torch CRF's memory budget, MiB (``--crf-memory-mb``): ``auto`` takes torch for
            an image only when its estimated peak (``crf.backend_choice.torch_memory_mb``) fits, and the
            torch backend runs its channels in chunks within it; None: ``default_memory_mb`` of the device.

    Returns:
        The ``predict.json`` record: checkpoint, model, device, CRF parameters and origin, and per image
        its size, the files written and (with the CRF) ``crf_backend``: backend, device, reason, memory_mb.

    Raises:
        PredictError, DataError, CheckpointError: bad input, before any inference.
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    if crf_backend is not None and crf_backend not in CRF_BACKENDS:
        raise PredictError(f"--crf-backend must be one of {', '.join(CRF_BACKENDS)}, got {crf_backend!r}")
    if crf_memory_mb is not None and (isinstance(crf_memory_mb, bool) or not isinstance(crf_memory_mb, (int, float))
                                      or not 0 < crf_memory_mb < float("inf")):
        raise PredictError(f"--crf-memory-mb must be a finite number of MiB > 0, got {crf_memory_mb!r}")
    sizes = check_images(paths)
    files = list(sizes)
    pred = load_predictor(weights, model=model, num_classes=num_classes, device=device, size=size)
    crf_params, origin, compatibility = crf_for(pred.checkpoint, params) if use_crf else (None, None, None)
    colours, colours_from = run_palette(pred.checkpoint)
    backend = crf_backend or "auto"
    crf_device = str(pred.device) if backend != "pydensecrf" else "cpu"
    choices = {p: crf_choice(p, sizes[p], pred.num_classes, backend, crf_device, crf_memory_mb, log)
               for p in files} if use_crf else {}
    out = Path(out)
    record = {"checkpoint": str(pred.checkpoint), "model": pred.name, "num_classes": pred.num_classes,
              "device": str(pred.device), "test_size": pred.size,
              "palette": colours_from,
              "crf": None if crf_params is None else {"params": crf_params.to_dict(), "from": origin,
                                                      "compatibility": None if compatibility is None else
                                                      compatibility.tolist(), "backend": backend,
                                                      "memory_mb": crf_memory_mb},
              "images": {}}
    log(f"predict: {len(files)} images, model {pred.name} from {pred.checkpoint} on {pred.device}"
        + (f"; CRF {crf_params.to_dict()} from {origin}" if crf_params is not None else ""))
    for p, choice in choices.items():
        log(f"predict: CRF of {p.name} ({sizes[p][1]}x{sizes[p][0]} pixels): {choice.backend} on {choice.device} "
            f"({choice.reason}; budget {choice.memory_mb:.0f} MiB)")
    multiple = int(getattr(pred.model, "output_stride", 8))
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress, dynamic_ncols=True)
    for batch in _batches(files, sizes, pred.size, multiple, batch_size):
        images = [read_image(p) for p in batch]
        maps = predict_batch(pred.model, images, size=pred.size, device=pred.device, batch_size=batch_size)
        for p, image, sm in zip(batch, images, maps):
            record["images"][p.stem] = _write_outputs(p, image, sm, out, crf_params, choices.get(p),
                                                      compatibility=compatibility, colours=colours)
            bar.update(1)
    bar.close()
    atomic_write_json(out / "predict.json", record)
    log(f"predict: wrote {out / 'dcnn'}" + (f", {out / 'crf'}" if use_crf else "") + f" and {out / 'overlay'}")
    return record


def crf_choice(path: Path, size: tuple[int, int], classes: int, backend: str, device: str,
               memory_mb: Optional[float], log: Callable[[str], None]) -> BackendChoice:
    """The CRF backend for one image of ``size`` (height, width) pixels and ``classes`` labels
    (``crf.backend_choice.resolve_backend``; ``memory_mb`` None: its default for ``device``). An explicit
    ``torch`` whose estimate exceeds the budget runs as asked, and a warning line says by how much (its
    lattices are not split: only its channels run in chunks)."""
    choice = resolve_backend(backend, device, [(classes, *size)], memory_mb=memory_mb)
    need = torch_memory_mb(size[0] * size[1], classes)
    if backend == "torch" and need > choice.memory_mb:
        log(f"predict: warning: the torch CRF of {path.name} ({size[1]}x{size[0]} pixels) needs ~{need:.0f} MiB, over its "
            f"{choice.memory_mb:.0f} MiB budget (--crf-backend auto or pydensecrf stays within it)")
    return choice


def _write_outputs(path: Path, image_bgr: np.ndarray, sm: ScoreMap, out: Path, params: Optional[CRFParams],
                   choice: Optional[BackendChoice], *, compatibility: Optional[np.ndarray] = None,
                   colours: Optional[np.ndarray] = None) -> dict:
    """Labels (and CRF labels, with the backend ``choice`` and the label ``compatibility``, None: Potts) of
    one image as palette PNGs in ``colours`` ((256, 3) uint8; None: VOC's), and the side-by-side overlay."""
    scores = sm.upsampled()
    dcnn = label_from_scores(scores)
    rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
    files = {"dcnn": out / "dcnn" / f"{path.stem}.png"}
    write_label(files["dcnn"], dcnn, palette=colours)
    panels = [("image", rgb), ("DCNN", blend(rgb, dcnn, palette=colours))]
    if params is not None and choice is not None:
        probs = torch.softmax(scores, 0).numpy()
        del scores  # (C, H, W) float32: 0.5 GB for a 3000 x 2000 photo, not needed by the CRF
        q = dense_crf(rgb, probs, params, backend=choice.backend, device=choice.device, memory_mb=choice.memory_mb,
                      compatibility=compatibility)
        del probs
        crf = q.argmax(0).astype(np.uint8)
        del q
        files["crf"] = out / "crf" / f"{path.stem}.png"
        write_label(files["crf"], crf, palette=colours)
        panels.append(("DCNN-CRF", blend(rgb, crf, palette=colours)))
    files["overlay"] = out / "overlay" / f"{path.stem}.png"
    buf = io.BytesIO()
    Image.fromarray(side_by_side(panels)).save(buf, format="PNG")
    atomic_write_bytes(files["overlay"], buf.getvalue())
    return {"image": str(path), "height": int(sm.height), "width": int(sm.width),
            **{k: str(v) for k, v in files.items()},
            **({"crf_backend": choice.to_dict()} if params is not None and choice is not None else {})}
