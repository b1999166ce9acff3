"""Experiment configuration: a typed schema (dataclasses) loaded from YAML and validated before any work.

One YAML file describes one experiment (STYLE.md: sections for model, data, train, test, CRF, search,
evaluation). Every key is checked: an unknown key, a value of the wrong type or a path that does not exist
stops with a ``ConfigError`` naming the dotted key and where its value came from: the ``--set`` that gave
it, else the YAML file (``KeySources``). Relative paths are resolved against the YAML file's folder.
``--set section.key=value`` overrides are applied before validation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from crf import CRFParams
from crf.params import RELEASE_LARGEFOV
from crf.search import SearchConfig

from .config_crf_rnn import CRFRNNConfig, crf_rnn_problem
from .errors import DeepLabError
from .data.layouts import data_problem, resolve_lists
from .experiment_files import ExperimentFileError, read_experiment
from .key_sources import KeySources, unknown_keys_message
from .key_sources import at as _at


class ConfigError(DeepLabError, ValueError):
    """An invalid experiment configuration; the message names the file and the key."""


@dataclass
class ModelConfig:
    """``model:`` section. ``name`` is a ``deeplab_v1.models.build_model`` name. ``init`` is the initial weights: a
    ``.caffemodel`` (release model or ImageNet VGG-16), a checkpoint of ours (``.pth``) or an ImageNet VGG-16 ``.pth`` in
    the common PyTorch layout; ``null`` starts from random weights (the report says so). ``output_stride``,
    ``multi_grid``, ``separable``, ``root`` are the v3/v3+ options of the same names (left unset for v1).
    ``crf_rnn``: the CRF as the net's last layer, trained end to end (``config_crf_rnn.CRFRNNConfig``)."""

    name: str = "deeplab-largefov"
    num_classes: int = 21
    init: Optional[Path] = None
    output_stride: Optional[int] = None
    multi_grid: Optional[list[int]] = None
    separable: Optional[bool] = None
    root: Optional[str] = None
    crf_rnn: CRFRNNConfig = field(default_factory=CRFRNNConfig)

    def options(self) -> dict[str, Any]:
        """The keyword options that are set (passed to ``build_model``): v3/v3+ ones, ``crf_rnn`` when enabled."""
        opts = {k: getattr(self, k) for k in ("output_stride", "separable", "root") if getattr(self, k) is not None}
        if self.multi_grid is not None:
            opts["multi_grid"] = tuple(self.multi_grid)
        return {**opts, **self.crf_rnn.build_options()}


@dataclass
class DataConfig:
    """``data:`` section (checks: ``deeplab_v1.data.layouts``, issue #23). ``layout``: ``voc`` (``root`` holds
    JPEGImages and SegmentationClass(Aug); a list is a split name or a deeplab-public list file), ``folder``
    (``images``, ``labels``: folders under ``root`` matched by file stem; a list is a file of stems, null:
    every stem) or ``cityscapes`` (labelIds -> the 19 trainIds). ``max_*_images`` keep the first N entries
    (null: all). ``class_names`` (null: the layout's), ``palette`` ([r, g, b] per class; null: VOC's),
    ``ignore_index`` (not scored; read as 255), ``trimap_band``: ``void`` (around void outlines, the
    release's) or ``boundary`` (around label changes, ``crf.trimap``)."""

    root: Path = Path("data/VOC2012")
    train_list: Optional[str] = None  # null: train (voc, cityscapes) or every stem (folder); likewise val
    test_list: Optional[str] = None
    max_train_images: Optional[int] = None
    max_test_images: Optional[int] = None
    layout: Literal["voc", "folder", "cityscapes"] = "voc"
    images: Optional[str] = None
    labels: Optional[str] = None
    class_names: Optional[list[str]] = None
    palette: Optional[list[list[int]]] = None
    ignore_index: int = 255
    trimap_band: Literal["void", "boundary"] = "void"

    def __post_init__(self) -> None:  # split names are the default lists of voc and cityscapes
        if self.layout != "folder":
            self.train_list, self.test_list = self.train_list or "train", self.test_list or "val"


@dataclass
class TrainConfig:
    """``train:`` section. Defaults are the LargeFOV ``solver.prototxt`` and ``train.prototxt``.

    ``iterations`` (Caffe ``max_iter``) of ``batch_size`` crops, gradients accumulated over ``iter_size``
    (Caffe's iter_size); lr ``base_lr`` with ``lr_policy`` ``step`` (x ``gamma`` every ``step_size``) or
    ``poly`` (v3: (1 - it/max)^``power``); ``momentum``, ``weight_decay``; lr x1/x2 weights/biases, x10/x20
    for the classifier (``classifier_lr_mult``). ``lr_mult``: per layer group multipliers that override
    those, an ordered mapping of layer-name glob patterns (Caffe names for v1: ``conv1_1`` ... ``fc8``,
    ``data_conv`` ... ``pool4_ms``; module paths for v3) to ``[weight, bias]`` (Caffe ``blobs_lr``), first
    match wins, 0 freezes (the MSc experiments: the trunk frozen, the branches x1 / x2; see
    ``engine.solver.caffe_param_groups``). ``label_mode``: ``shrink`` (v1: labels sampled at the
    score-map positions, INTERP shrink_factor 8) or ``upsample`` (v3: logits upsampled to the crop).
    ``scale_range``: random rescaling (v3: [0.5, 2.0]). ``batchnorm``: ``finetune`` or ``frozen`` (v3
    models). ``output_stride``: v3 training output_stride (null: the model's). ``iterations: 0`` skips
    training and tests the initial weights.

    How the work is done (never what it computes, except ``precision``): ``num_workers`` DataLoader
    worker processes (null: from the core count; 0 loads in the main process); ``precision`` ``fp32``
    (default, the release), ``bf16`` or ``fp16`` (autocast; a GradScaler for fp16); ``compile`` wraps
    the model in ``torch.compile``; ``channels_last`` memory format; ``sync_batchnorm`` (v3/v3+ under
    DDP); ``tensorboard`` logs loss, lr and predictions (needs the ``tensorboard`` extra).
    """

    iterations: int = 6000
    batch_size: int = 30
    iter_size: int = 1
    crop_size: Optional[int] = None
    mirror: bool = True
    base_lr: float = 0.001
    lr_policy: Literal["step", "poly"] = "step"
    gamma: float = 0.1
    step_size: int = 2000
    power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0005
    classifier_lr_mult: float = 10.0
    lr_mult: Optional[dict[str, list[float]]] = None
    label_mode: Literal["shrink", "upsample"] = "shrink"
    scale_range: Optional[list[float]] = None
    batchnorm: Literal["finetune", "frozen"] = "finetune"
    output_stride: Optional[int] = None
    checkpoint_every: int = 2000
    log_every: int = 10
    num_workers: Optional[int] = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    channels_last: bool = False
    sync_batchnorm: bool = False
    tensorboard: bool = False


@dataclass
class TestConfig:
    """``test:`` section. ``size``: the test padding (513; 514 for ``deeplab``; null: the model's).
    ``scales``/``flip``: multi-scale and left-right flip inference (v3; probabilities averaged).
    ``score_source``: ``network`` or ``degraded-gt`` (a DIAGNOSTIC source of DCNN-like scores made from
    degraded ground truth, for working on the CRF without a trained network; labelled in every output).
    ``output_stride``: v3 evaluation output_stride (null: the model's). ``batch_size`` images per
    forward (each padded to ``size``, so batching is exact), ``num_workers`` loader processes (null:
    from the core count), ``precision`` ``fp32`` (default) / ``bf16`` / ``fp16`` autocast,
    ``compile`` and ``channels_last`` as in ``train``.
    """

    size: Optional[int] = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    score_source: Literal["network", "degraded-gt"] = "network"
    output_stride: Optional[int] = None
    batch_size: int = 1
    num_workers: Optional[int] = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    channels_last: bool = False


@dataclass
class CRFConfig:
    """``crf:`` section: the fully connected CRF (paper Sec. 4.2) run on every test image.

    ``params`` (``crf.CRFParams``; in YAML a mapping, keys left out keep these values) default to the
    release's LargeFOV ``run_densecrf.sh`` values (w1 4, sigma_alpha 49, sigma_beta 5, w2 3, sigma_gamma 3,
    10 iterations). When ``use_search`` is true and the run's ``crf_search`` stage has found best
    parameters, those are used instead (the report says which). ``backend``: ``auto`` (the torch
    backend when it is installed and the inputs fit ``memory_mb``, else pydensecrf; the choice is
    recorded), ``pydensecrf`` (the reference) or ``torch``; ``device`` of the torch backend;
    ``workers`` CPU processes (null: ``crf.pool.default_workers``, one single-threaded process per core
    on CPU); ``memory_mb`` the budget that chooses the backend and bounds a torch batch (null: a fixed
    4096 MiB, never this machine's memory).
    """

    enabled: bool = True
    params: CRFParams = RELEASE_LARGEFOV
    use_search: bool = True
    backend: Literal["auto", "pydensecrf", "torch"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    workers: Optional[int] = None
    memory_mb: Optional[int] = None


@dataclass
class CRFSearchConfig:
    """``crf_search:`` section: the paper's coarse-to-fine cross-validation of w1, sigma_alpha, sigma_beta
    (Sec. 5: w2 = 3, sigma_gamma = 3 fixed; w1 in [5, 10], sigma_alpha in [50:10:100], sigma_beta in
    [3:1:10]; 100 val images drawn with a fixed seed).

    The stage's own keys are ``enabled``, ``num_images`` and ``seed`` (which images); every other key of
    the section is a field of ``crf.search.SearchConfig`` (``w1``, ``sigma_alpha``, ``sigma_beta``,
    ``w2``, ``sigma_gamma``, ``iterations``, ``rounds``, ``shrink``, ``objective`` (``miou`` or
    ``trimap_miou``), ``trimap_width``, ``backend`` (``auto``, ``torch``, ``pydensecrf``), ``device``,
    ``workers``, ``memory_mb``, ``strategy`` (``grid``, the paper's, or ``halving``: successive halving),
    ``eta``, ``min_images``, ``halving_seed``, ``halving_floor``), checked by it and kept as ``search``: the one definition
    of the search's configuration.
    """

    enabled: bool = False
    num_images: int = 100
    seed: int = 0
    search: SearchConfig = field(default_factory=SearchConfig)

    @staticmethod
    def search_keys() -> list[str]:
        """The ``SearchConfig`` fields the section may set: all but ``label`` (the stage says where the
        scores come from) and ``cache_mb`` (a machine's memory, not an experiment's)."""
        return [f.name for f in dataclasses.fields(SearchConfig) if f.name not in ("label", "cache_mb")]


@dataclass
class EvaluationConfig:
    """``evaluation:`` section: trimap band widths (pixels; paper Fig. 5 uses 1..40)."""

    trimap_widths: list[int] = field(default_factory=lambda: list(range(1, 41)))


#: The stages in pipeline order (paper Fig. 1: DCNN -> bilinear upsampling -> CRF, then the evaluation).
STAGES: tuple[str, ...] = ("train", "test", "crf_search", "crf", "evaluate")


@dataclass
class ExperimentConfig:
    """A whole experiment. ``output_dir``: the run folder (relative to the YAML file's folder; default
    ``./runs/<name>`` under the current folder, as mmsegmentation's work_dirs). ``tf32``: allow TF32 matmuls/convolutions on CUDA (off: the release's fp32). ``stages``: which of train, test, crf_search, crf, evaluate ``deeplab run`` runs."""

    name: str = "experiment"
    seed: int = 0
    output_dir: Optional[Path] = None
    device: Literal["cpu", "cuda"] = "cpu"
    tf32: bool = False
    stages: list[str] = field(default_factory=lambda: ["train", "test", "crf_search", "crf", "evaluate"])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    crf_search: CRFSearchConfig = field(default_factory=CRFSearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    #: the YAML file this came from (not a key)
    source: Optional[Path] = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        """The run folder (absolute)."""
        assert self.output_dir is not None
        return self.output_dir


# ----------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _unknown(where: str, dotted: list[str], known: list[str]) -> "ConfigError":
    return ConfigError(unknown_keys_message(where, dotted, known))


def _crf_params(value: Any, key: str, where: str) -> CRFParams:
    """A YAML mapping of CRF parameters, the keys left out taken from the release's LargeFOV values."""
    if isinstance(value, CRFParams):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{_at(where, key)}: key '{key}' must be a mapping of CRF parameters, got {value!r}")
    try:
        return CRFParams.from_dict({**RELEASE_LARGEFOV.to_dict(), **value})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_at(where, key)}: key '{key}' is invalid: {exc}") from exc


def _search_section(values: Any, key: str, where: str) -> CRFSearchConfig:
    """The flat ``crf_search:`` mapping: the stage's keys, the rest through ``SearchConfig``'s checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"{_at(where, key)}: section '{key}' must be a mapping, got {values!r}")
    stage_keys = {"enabled", "num_images", "seed"}
    search_keys = set(CRFSearchConfig.search_keys())
    unknown = [k for k in values if k not in stage_keys | search_keys]
    if unknown:
        raise _unknown(where, [f"{key}.{k}" for k in unknown], sorted(stage_keys | search_keys))
    hints = typing.get_type_hints(CRFSearchConfig)
    stage = {k: _coerce(v, hints[k], f"{key}.{k}", where) for k, v in values.items() if k in stage_keys}
    search_values = {k: v for k, v in values.items() if k in search_keys}
    try:  # SearchConfig checks its own fields (types and ranges) with messages naming them
        search = SearchConfig.from_dict(search_values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_at(where, key)}: key '{key}' is invalid: {str(exc).replace('SearchConfig.', key + '.')}") from exc
    return CRFSearchConfig(**stage, search=search)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (ints to floats, str to Path)."""
    if tp is CRFParams:
        return _crf_params(value, key, where)
    if tp is CRFSearchConfig:
        return _search_section(value, key, where)
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{_at(where, key)}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string; YAML 1.2 and users mean a number
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise bad
        return Path(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(where, key)}: section '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, where)
    raise bad  # pragma: no cover - every annotation above is handled


def _build(cls: type, values: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise _unknown(where, [f"{prefix + '.' if prefix else ''}{k}" for k in unknown], sorted(fields))
    kwargs = {}
    for name, value in values.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into (path, value).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.iterations=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """Apply ``--set`` overrides to a raw YAML mapping (a deep copy is returned).

    Raises:
        ConfigError: the override descends into a key that is not a mapping.
    """
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: --set {text!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return raw


def _resolve(path: Optional[Path], base: Path) -> Optional[Path]:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check_lr_mult(cfg: ExperimentConfig, fail: Any) -> None:
    """``train.lr_mult``: each value [weight, bias] of two numbers >= 0; each pattern matches a layer."""
    import torch

    from .engine.solver import layer_name_of
    from .models import build_model

    for pattern, mults in cfg.train.lr_mult.items():
        ok = isinstance(mults, list) and len(mults) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in mults)
        if not ok:
            fail(f"train.lr_mult.{pattern}", f"must be [weight_mult, bias_mult], two numbers >= 0, got {mults!r}")
    with torch.device("meta"):  # layer names only: no memory, no initialisation cost
        model = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.options())
    layers = sorted(set(layer_name_of(model).values()))
    import fnmatch

    for pattern in cfg.train.lr_mult:
        if not any(fnmatch.fnmatchcase(layer, pattern) for layer in layers):
            shown = ", ".join(layers[:40]) + (" ..." if len(layers) > 40 else "")
            fail(f"train.lr_mult.{pattern}", f"matches no layer of {cfg.model.name} (layers: {shown})")


def validate(cfg: ExperimentConfig, where: str, *, check_paths: bool = True) -> None:
    """Semantic checks that need more than types (values, model names, existing paths).

    Raises:
        ConfigError: naming the file and the key.
    """
    from .models import MODEL_NAMES  # late import: config stays light

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{_at(where, key)}: key '{key}' {msg}")

    if cfg.model.name not in MODEL_NAMES:
        fail("model.name", f"is {cfg.model.name!r}, not a known model ({', '.join(MODEL_NAMES)})")
    if cfg.model.num_classes < 2:
        fail("model.num_classes", f"must be >= 2, got {cfg.model.num_classes}")
    for stage in cfg.stages:
        if stage not in STAGES:
            fail("stages", f"has unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    for key in ("iterations", "checkpoint_every", "log_every", "step_size"):
        if getattr(cfg.train, key) < (0 if key == "iterations" else 1):
            fail(f"train.{key}", f"must be positive, got {getattr(cfg.train, key)}")
    for key in ("batch_size", "iter_size"):
        if getattr(cfg.train, key) < 1:
            fail(f"train.{key}", f"must be >= 1, got {getattr(cfg.train, key)}")
    if cfg.train.base_lr <= 0:
        fail("train.base_lr", f"must be > 0, got {cfg.train.base_lr}")
    if cfg.train.lr_mult is not None:
        _check_lr_mult(cfg, fail)
    if cfg.train.scale_range is not None and (
        len(cfg.train.scale_range) != 2 or not 0 < cfg.train.scale_range[0] <= cfg.train.scale_range[1]
    ):
        fail("train.scale_range", f"must be [min, max] with 0 < min <= max, got {cfg.train.scale_range}")
    if not cfg.test.scales or any(s <= 0 for s in cfg.test.scales):
        fail("test.scales", f"must be a non-empty list of positive factors, got {cfg.test.scales}")
    for key in ("max_train_images", "max_test_images"):
        v = getattr(cfg.data, key)
        if v is not None and v < 1:
            fail(f"data.{key}", f"must be >= 1 or null, got {v}")
    # sizes: null takes the variant's release value; 0 or less is a mistake, never a silent default
    if cfg.train.crop_size is not None and cfg.train.crop_size < 1:
        fail("train.crop_size", f"must be a positive number of pixels (or null: the release's crop), got {cfg.train.crop_size}")
    if cfg.test.size is not None and cfg.test.size < 1:
        fail("test.size", f"must be a positive number of pixels (or null: the release's test size), got {cfg.test.size}")
    if cfg.crf.workers is not None and cfg.crf.workers < 1:
        fail("crf.workers", f"must be >= 1 worker processes (or null: one per core), got {cfg.crf.workers}")
    for key, v in (("train.num_workers", cfg.train.num_workers), ("test.num_workers", cfg.test.num_workers)):
        if v is not None and v < 0:
            fail(key, f"must be >= 0 loader processes (0: in the main process; null: from the core count), got {v}")
    if cfg.test.batch_size < 1:
        fail("test.batch_size", f"must be >= 1, got {cfg.test.batch_size}")
    if cfg.crf.memory_mb is not None and cfg.crf.memory_mb < 1:
        fail("crf.memory_mb", f"must be a positive number of MB (or null: the device's default), got {cfg.crf.memory_mb}")
    if cfg.train.output_stride is not None and cfg.train.output_stride not in (8, 16, 32):
        fail("train.output_stride", f"must be 8, 16 or 32, got {cfg.train.output_stride}")
    if cfg.test.output_stride is not None and cfg.test.output_stride not in (8, 16, 32):
        fail("test.output_stride", f"must be 8, 16 or 32, got {cfg.test.output_stride}")
    s = cfg.crf_search
    if s.num_images < 1:
        fail("crf_search.num_images", f"must be >= 1, got {s.num_images}")
    if any(w < 1 for w in cfg.evaluation.trimap_widths) or not cfg.evaluation.trimap_widths:
        fail("evaluation.trimap_widths", f"must be positive pixel widths, got {cfg.evaluation.trimap_widths}")
    problem = data_problem(cfg.data, cfg.model.num_classes, check_paths=check_paths) or crf_rnn_problem(cfg.model.crf_rnn)
    if problem:
        fail(*problem)
    if check_paths and cfg.model.init is not None and not cfg.model.init.is_file():
        fail("model.init", f"points to {cfg.model.init}, which does not exist")
    problem = _output_dir_problem(cfg.run_dir) if check_paths else None
    if problem:
        fail("output_dir", f"points to {cfg.run_dir}, {problem}")


def _output_dir_problem(path: Path) -> Optional[str]:
    """Why the run folder ``path`` can be neither written nor created (None when it can), checked before
    any work (issue #21: ``--set output_dir=/proc/x`` printed only ``[Errno 2] ...``). A folder that does
    not exist yet is tried by creating (and removing) a temporary folder in its nearest existing parent."""
    if path.is_dir():
        return None if os.access(path, os.W_OK | os.X_OK) else "a folder this user cannot write"
    parent = path
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if path.exists():
        return "which is a file, not a folder"
    if not parent.is_dir():
        return f"under {parent}, which is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deeplab-check-", dir=parent))
    except OSError as exc:
        return f"which cannot be created in {parent} ({exc.strerror or exc})"
    return None


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None, *, check_paths: bool = True) -> ExperimentConfig:
    """Load, override, type-check and validate an experiment YAML.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings (``--set``), applied before validation.
        check_paths: check that data/init paths exist (off for tests of the schema alone).

    Returns:
        The experiment with absolute paths (relative ones are taken from the YAML file's folder).

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, an unknown key, a wrong type, an invalid
            value or a missing path; the message names the file and the key.
    """
    path = Path(path)
    where = KeySources(str(path), overrides or [])
    if not path.is_file():
        raise ConfigError(f"{where}: experiment file not found")
    try:  # the file and its ``base:`` chain, merged (deeplab_v1.experiment_files)
        raw, _chain = read_experiment(path)
    except ExperimentFileError as exc:
        raise ConfigError(str(exc)) from exc
    raw = apply_overrides(raw, overrides or [], where)
    cfg = _build(ExperimentConfig, raw, "", where)
    base = path.resolve().parent
    cfg.source = path.resolve()
    cfg.data.root = _resolve(cfg.data.root, base)
    cfg.model.init = _resolve(cfg.model.init, base)
    resolve_lists(cfg.data, base)  # list files, relative to the YAML's folder
    cfg.output_dir = _resolve(cfg.output_dir, base) if cfg.output_dir else (Path.cwd() / "runs" / cfg.name).resolve()
    validate(cfg, where, check_paths=check_paths)
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as plain YAML-friendly data (paths as strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, CRFParams):
            return v.to_dict()
        if isinstance(v, CRFSearchConfig):
            search = {k: plain(getattr(v.search, k)) for k in CRFSearchConfig.search_keys()}
            return {"enabled": v.enabled, "num_images": v.num_images, "seed": v.seed, **search}
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name != "source"}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)
