"""What each stage's output depends on, as a fingerprint stored in its completion record.

A stage's fingerprint is the sha256 of (a) the configuration keys it reads (``STAGE_KEYS``, less the
ones that cannot change its result, ``NEUTRAL_KEYS``: worker counts, log and checkpoint intervals), (b) the
content of the files those keys name (``model.init``, list files: size and sha256) and (c) the
fingerprints of the stages whose artifacts it reads (``UPSTREAM``). On a rerun the runner compares it with
the record: a stage whose fingerprint changed is redone, and so, through (c), is every stage after it;
the log names the keys that changed. Nothing is reused silently.

What can change a result without being a plain config key is stamped too (issue #20): the top-level
``device`` of the stages that run the network (CPU scores are not reused on CUDA; ``precision`` and ``tf32``
are keys of theirs already), the labels of a test stage whose scores are made from them
(``test.score_source: degraded-gt``), and, under ``backend: auto``, the CRF backend that will run
(:func:`crf_backend_stamp`, :func:`search_backend_stamp`: resolved as the stages do, from the images' sizes
and the memory budget, so a ``memory_mb`` or a machine that switches torch <-> pydensecrf redoes the stage,
while a budget that changes nothing redoes nothing), and the content of ``crf_search/learned.json`` that the
crf stage applies (``crf.use_learned``, issue #24).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from crf.parallel import run_backend
from PIL import Image

from .config import ExperimentConfig, to_dict
from .context import RunContext
from .data.lists import Sample, choose_subset
from .weights.checkpoint import file_sha256

#: The dataset's keys that change what is read (the layout, the folders, the label mapping).
_DATA_KEYS = ("data.layout", "data.images", "data.labels", "data.ignore_index")
#: Dotted config keys (a key covers its whole section) each stage's result depends on.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("seed", "model", "data.root", "data.train_list", "data.max_train_images", *_DATA_KEYS, "train", "tf32",
              "device"),
    "test": ("seed", "model", "data.root", "data.test_list", "data.max_test_images", *_DATA_KEYS, "data.palette",
             "test", "tf32", "device"),
    "crf_search": ("crf_search", "model.num_classes", "data.trimap_band"),
    "crf": ("crf.enabled", "crf.params", "crf.use_search", "crf.use_learned", "crf.backend", "crf.device",
            "crf.memory_mb", "data.palette"),
    "evaluate": ("evaluation", "crf.enabled", "model.num_classes", "data.trimap_band", "data.class_names",
                 "data.palette"),
}

#: Keys added after runs were recorded (issue #23): at these values they are left out of a fingerprint,
#: so that a run made before them is not redone for a key whose value it already had.
LATER_DEFAULTS: dict[str, Any] = {"data.layout": "voc", "data.images": None, "data.labels": None,
                                  "data.ignore_index": 255, "data.trimap_band": "void", "data.class_names": None,
                                  "data.palette": None, "crf.use_learned": True, "crf_search.learn": []}

#: Keys inside those sections that change how the work is done, never its result (``*.memory_mb``: the
#: backend it picks under ``auto`` is stamped instead, ``crf_backend_stamp``).
NEUTRAL_KEYS: frozenset[str] = frozenset({
    "train.checkpoint_every", "train.log_every", "train.num_workers", "train.tensorboard",
    "test.num_workers", "test.batch_size", "crf_search.workers", "crf_search.memory_mb", "crf.workers", "crf.memory_mb",
})

#: The stages whose artifacts each stage reads.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "train": (),
    "test": ("train",),
    "crf_search": ("test",),
    "crf": ("test", "crf_search"),
    "evaluate": ("test", "crf"),
}

#: The data files each stage reads: (list, which files of each sample). Their size and mtime count, so a
#: fixed label or a replaced image redoes the stages that read it (and, through UPSTREAM, the ones after).
STAGE_DATA: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "train": (("train", ("image", "label")),),
    "test": (("test", ("image",)),),
    "crf_search": (("test", ("image", "label")),),
    "crf": (("test", ("image",)),),
    "evaluate": (("test", ("label",)),),
}

#: Keys whose value is a file: its content counts, not only its name.
FILE_KEYS: tuple[str, ...] = ("model.init", "data.train_list", "data.test_list")

_file_cache: dict[tuple[str, int, int], str] = {}
_size_cache: dict[tuple[str, int, int], tuple[int, int]] = {}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _file_digest(value: Any) -> Optional[str]:
    """size:sha256 of a file named by a config value (cached by path, size and mtime), or None."""
    if not isinstance(value, str) or not Path(value).is_file():
        return None
    st = Path(value).stat()
    key = (value, st.st_size, st.st_mtime_ns)
    if key not in _file_cache:
        _file_cache[key] = f"{st.st_size}:{file_sha256(Path(value))}"
    return _file_cache[key]


def stage_data(stage: str, config: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The data files ``stage`` reads (:data:`STAGE_DATA`), and the test labels for a test stage that
    makes its scores from them (``test.score_source`` other than ``network``, issue #20)."""
    if stage == "test" and config.get("test", {}).get("score_source", "network") != "network":
        return (("test", ("image", "label")),)
    return STAGE_DATA[stage]


def stage_inputs(stage: str, config: dict) -> dict[str, Any]:
    """The flattened config keys ``stage`` depends on (``config``: ``config.to_dict`` of the experiment),
    with the digests of the files they name as ``<key>#content``."""
    flat = _flatten(config)
    off = "model.crf_rnn." if not flat.get("model.crf_rnn.enabled") else None  # a section that is off counts not
    chosen = {k: v for k, v in flat.items() if k not in NEUTRAL_KEYS and any(
        k == p or k.startswith(p + ".") for p in STAGE_KEYS[stage])
        and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k]) and not (off and k.startswith(off))}
    for k in FILE_KEYS:
        if k in chosen:
            chosen[f"{k}#content"] = _file_digest(chosen[k])
    return chosen


def data_stamp(paths: Iterable[Optional[Path]]) -> str:
    """sha256 of the (path, size, mtime) of data files: what ``data.check`` also keys its cache by, cheap
    for a 10,582-image list. A missing path (a sample without a label) counts as ``-``.

    Raises:
        OSError: a file that cannot be stat'ed (the data check names it first).
    """
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            h.update(b"-\n")
            continue
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def image_shapes(paths: Iterable[Path], channels: int) -> list[tuple[int, int, int]]:
    """(channels, H, W) of each image, from its header (cached by path, size and mtime): the shapes of the
    probabilities a CRF stage will run on (scores upsampled to the image size).

    Raises:
        OSError: a file that cannot be opened (the data check names it first).
    """
    shapes = []
    for p in paths:
        st = Path(p).stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _size_cache:
            with Image.open(p) as im:
                _size_cache[key] = (im.height, im.width)
        shapes.append((channels, *_size_cache[key]))
    return shapes


def crf_backend_stamp(backend: str, device: str, memory_mb: Optional[float],
                      shapes: Sequence[Sequence[int]]) -> str:
    """The backend the crf stage will run: ``crf.parallel.run_backend`` of the configuration and the images'
    (C, H, W) shapes, the very call the stage makes (``auto`` resolved once for every image, within
    ``memory_mb`` or the fixed default budget). An explicit backend is itself."""
    return run_backend(backend, device, shapes, memory_mb=memory_mb).backend


def search_backend_stamp(search: dict, shapes: Sequence[Sequence[int]]) -> str:
    """The backend the CRF search will run: ``crf.parallel.run_backend`` as ``crf.search.plan.make_plan``
    calls it (the search images' shapes, ``memory_mb``, ``len(w1)`` configurations per call). ``search``: the
    ``crf_search`` section of ``config.to_dict``."""
    return run_backend(search.get("backend", "auto"), search.get("device", "cpu"), shapes,
                       memory_mb=search.get("memory_mb"), configs=len(search.get("w1") or [1])).backend


def backend_inputs(stage: str, cfg: ExperimentConfig, test_samples: Sequence[Sample]) -> dict[str, str]:
    """Under ``backend: auto``, the CRF backend ``stage`` will run, for its fingerprint
    (``crf.backend#resolved``, ``crf_search.backend#resolved``): torch and pydensecrf differ in the last
    bits (issue #20). ``test_samples``: the run's test list. Other stages and explicit backends: {}."""
    n = cfg.model.num_classes
    if stage == "crf" and cfg.crf.enabled and cfg.crf.backend == "auto":
        c = cfg.crf
        shapes = image_shapes([x.image for x in test_samples], n)
        return {"crf.backend#resolved": crf_backend_stamp(c.backend, c.device, c.memory_mb, shapes)}
    search = to_dict(cfg)["crf_search"]
    if stage == "crf_search" and search["enabled"] and search["backend"] == "auto":
        samples = {x.id: x for x in test_samples}
        ids = choose_subset(list(samples), cfg.crf_search.num_images, cfg.crf_search.seed)
        return {"crf_search.backend#resolved": search_backend_stamp(search,
                                                                    image_shapes([samples[i].image for i in ids], n))}
    return {}


def fingerprint(inputs: dict[str, Any], upstream: dict[str, Optional[str]]) -> str:
    """sha256 of a stage's inputs and its upstream stages' fingerprints."""
    text = json.dumps({"inputs": inputs, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose value differs between two ``stage_inputs`` (added and removed ones included)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def stage_fingerprint(ctx: RunContext, stage: str) -> tuple[str, dict]:
    """(fingerprint, inputs) of ``stage`` in ``ctx``'s run now: its config keys and files
    (:func:`stage_inputs`), the size and mtime of the data files it reads (:func:`data_stamp`), the
    backend it would resolve (:func:`backend_inputs`) and the fingerprints recorded by the stages it reads
    from (``UPSTREAM``)."""
    config = to_dict(ctx.cfg)
    inputs = stage_inputs(stage, config)
    for split, fields in stage_data(stage, config):  # the data files it reads: size and mtime
        if split == "train" and ctx.cfg.train.iterations == 0:
            continue  # no training: the list is not read
        samples = ctx.train_samples() if split == "train" else ctx.test_samples()
        for f in fields:
            inputs[f"data.{split}_{f}s#files"] = data_stamp(getattr(x, f) for x in samples)
    inputs.update(backend_inputs(stage, ctx.cfg, ctx.test_samples()))
    learned = ctx.layout.learned
    if stage == "crf" and ctx.cfg.crf.use_search and ctx.cfg.crf.use_learned and learned.is_file():
        # a refit (or a hand-edited learned.json) redoes the crf stage
        inputs["crf_search.learned#content"] = hashlib.sha256(learned.read_bytes()).hexdigest()
    upstream = {u: (ctx.layout.read_record(u) or {}).get("fingerprint") for u in UPSTREAM[stage]}
    return fingerprint(inputs, upstream), inputs
