"""Experiment configuration: a typed schema (pydantic v2 models) loaded from YAML and validated before any work.

One YAML file describes one experiment (STYLE.md: sections for model, data, train, test, CRF, search,
evaluation). Every key is checked: an unknown key, a value of the wrong type or out of range, or a path that
does not exist stops with a ``ConfigError`` naming the dotted key and where its value came from: the
``--set`` that gave it, else the YAML file (``KeySources``). Types and ranges are the schema's (``Field``
limits, ``Literal`` choices; pydantic's errors are translated by ``key_sources.schema_error_message``); the checks
here are the ones only we can make (model names, stages, the dataset, paths). Relative paths are resolved
against the YAML file's folder. ``--set section.key=value`` overrides are applied before validation. A key
is one line of its section (``_limited``: a range with a message of its own).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from crf import CRFParams
from crf.params import RELEASE_LARGEFOV
from crf.search import SearchConfig
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, InstanceOf, PlainValidator,
                      PrivateAttr, StrictBool, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .data.layouts import data_problem, resolve_lists
from .errors import DeepLabError
from .experiment_files import ExperimentFileError, read_experiment
from .key_sources import KeySources, problem, schema_error_message, unknown
from .key_sources import at as _at

__all__ = ["ConfigError", "CRFRNNConfig", "ModelConfig", "DataConfig", "TrainConfig", "TestConfig", "CRFConfig", "CRFSearchConfig",
           "EvaluationConfig", "ExperimentConfig", "STAGES", "load_config", "to_dict", "parse_override",
           "apply_overrides", "validate"]


class ConfigError(DeepLabError, ValueError):
    """An invalid experiment configuration; the message names the file and the key."""


def _yaml_number(value: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string; YAML 1.2 and users mean a number. NaN and infinity are not."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise problem(f"must be float, got {value!r}")
    return value


#: A float key: an int or a float (or a number PyYAML left as a string), never a bool, NaN or infinity.
Float = Annotated[float, BeforeValidator(_yaml_number), Field(strict=True)]


def _stride(value: int) -> int:
    if value not in (8, 16, 32):
        raise problem(f"must be 8, 16 or 32, got {value}")
    return value


#: An output stride of the v3/v3+ encoders.
Stride = Annotated[StrictInt, AfterValidator(_stride)]


def _each_once(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise problem(f"must name each of w1, w2, compatibility at most once, got {value}")
    return value


#: What a CRF fit learns (``crf.DenseCRFLayer``'s ``learn``), each name once.
Learnable = Annotated[list[Literal["w1", "w2", "compatibility"]], AfterValidator(_each_once)]


def _crf_params(value: Any) -> CRFParams:
    """A YAML mapping of CRF parameters, the keys left out taken from the release's LargeFOV values."""
    if isinstance(value, CRFParams):
        return value
    if not isinstance(value, dict):
        raise problem(f"must be a mapping of CRF parameters, got {value!r}")
    try:
        return CRFParams.from_dict({**RELEASE_LARGEFOV.to_dict(), **value})
    except (TypeError, ValueError) as exc:
        raise problem(f"is invalid: {exc}") from exc


#: A ``crf.CRFParams`` key: a YAML mapping, the keys left out the release's LargeFOV values.
Params = Annotated[CRFParams, PlainValidator(_crf_params)]


def _limited(default: Any, must: str = "", **limits: Any) -> Any:
    """A field with pydantic's ``limits`` (``ge``, ``gt``, ``min_length``) whose breach reads ``key '...' must
    <must>, got <value>`` (without ``must``: ``must be >= <ge>`` or ``must be > <gt>``)."""
    return Field(default, **limits, json_schema_extra={"must": must} if must else None)


class _Section(BaseModel):
    """A section: unknown keys are errors; code may set attributes (paths resolved after loading)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    @classmethod
    def known_keys(cls) -> list[str]:
        """The keys a YAML mapping of this section may have."""
        return list(cls.model_fields)


class CRFRNNConfig(_Section):
    """``model.crf_rnn:`` section: DeepLab trained end to end with the CRF as its last layer (CRF-as-RNN,
    Zheng et al. ICCV 2015; DeepLab v1 Sec. 6; issue #24 item 3). ``enabled`` appends ``crf.DenseCRFLayer``
    to the model (any v1 or v3 name; ``deeplab_v1.models.crf_rnn``): the stride-8 scores are upsampled
    bilinearly to the input and refined by ``iterations_train`` mean-field steps in training (the loss on the
    refined scores at the crop's resolution, labels not shrunk, whatever ``train.label_mode`` says) and
    ``iterations_test`` at test (the score cache holds the refined scores at image resolution, stride 1).
    ``learn``: which of ``w1``, ``w2``, ``compatibility`` (C x C, started Potts) are trained (their lr: the
    ``train.lr_mult`` pattern ``crf``, default x1; no weight decay). ``params``: the initial ``crf.CRFParams``
    (a mapping; keys left out take the release's LargeFOV values; a learned weight must start > 0); the
    kernel widths stay fixed. With it on, the ``crf_search`` and ``crf`` stages are skipped."""

    enabled: StrictBool = False
    iterations_train: StrictInt = _limited(5, "be >= 1 mean-field iterations", ge=1)
    iterations_test: StrictInt = _limited(10, "be >= 1 mean-field iterations", ge=1)
    learn: Learnable = ["w1", "w2", "compatibility"]
    params: Params = RELEASE_LARGEFOV

    @field_validator("params")
    @classmethod
    def _learnable(cls, value: CRFParams, info: ValidationInfo) -> CRFParams:
        for name in ("w1", "w2"):  # log-parametrised in the layer
            if name in (info.data.get("learn") or []) and getattr(value, name) <= 0:
                raise problem(f"has {name} = {getattr(value, name)}, which cannot be learned (a learned kernel "
                              f"weight must start > 0); set it > 0 or leave {name} out of learn")
        return value

    def build_options(self) -> dict[str, Any]:
        """``{"crf_rnn": {...}}``, the ``build_model`` option that appends the layer, or ``{}`` when off."""
        if not self.enabled:
            return {}
        return {"crf_rnn": {"params": self.params, "learn": tuple(self.learn),
                            "iterations_train": self.iterations_train, "iterations_test": self.iterations_test}}


class ModelConfig(_Section):
    """``model:`` section.

    ``name`` is a ``deeplab_v1.models.build_model`` name. ``init`` is the initial weights: a ``.caffemodel``
    (release model or ImageNet VGG-16), a checkpoint of ours (``.pth``) or an ImageNet VGG-16 ``.pth`` in the
    common PyTorch layout; ``null`` starts from random weights (the report says so). ``output_stride``,
    ``multi_grid``, ``separable``, ``root`` are the v3/v3+ options of the same names (left unset for v1).
    ``crf_rnn``: the CRF as the net's last layer, trained end to end (:class:`CRFRNNConfig`).
    """

    name: StrictStr = "deeplab-largefov"
    num_classes: StrictInt = _limited(21, ge=2)
    init: Optional[Path] = None
    output_stride: Optional[StrictInt] = None
    multi_grid: Optional[list[StrictInt]] = None
    separable: Optional[StrictBool] = None
    root: Optional[StrictStr] = None
    crf_rnn: CRFRNNConfig = Field(default_factory=CRFRNNConfig)

    def options(self) -> dict[str, Any]:
        """The keyword options that are set (passed to ``build_model``): v3/v3+ ones, ``crf_rnn`` when enabled."""
        opts = {k: getattr(self, k) for k in ("output_stride", "multi_grid", "separable", "root")}
        opts = {k: v for k, v in opts.items() if v is not None}
        if "multi_grid" in opts:
            opts["multi_grid"] = tuple(opts["multi_grid"])
        return {**opts, **self.crf_rnn.build_options()}


class DataConfig(_Section):
    """``data:`` section (checks: ``deeplab_v1.data.layouts``, issue #23). ``layout``: ``voc`` (``root`` holds
    JPEGImages and SegmentationClass(Aug); a list is a split name or a deeplab-public list file), ``folder``
    (``images``, ``labels``: folders under ``root`` matched by file stem; a list is a file of stems, null:
    every stem) or ``cityscapes`` (labelIds -> the 19 trainIds). ``max_*_images`` keep the first N entries
    (null: all). ``class_names`` (null: the layout's), ``palette`` ([r, g, b] per class; null: VOC's),
    ``ignore_index`` (not scored; read as 255), ``trimap_band``: ``void`` (around void outlines, the
    release's) or ``boundary`` (around label changes, ``crf.trimap``)."""

    root: Path = Path("data/VOC2012")
    train_list: Optional[StrictStr] = None  # null: train (voc, cityscapes) or every stem (folder); likewise val
    test_list: Optional[StrictStr] = None
    max_train_images: Optional[StrictInt] = _limited(None, "be >= 1 or null", ge=1)
    max_test_images: Optional[StrictInt] = _limited(None, "be >= 1 or null", ge=1)
    layout: Literal["voc", "folder", "cityscapes"] = "voc"
    images: Optional[StrictStr] = None
    labels: Optional[StrictStr] = None
    class_names: Optional[list[StrictStr]] = None
    palette: Optional[list[list[StrictInt]]] = None
    ignore_index: StrictInt = 255
    trimap_band: Literal["void", "boundary"] = "void"

    @model_validator(mode="after")
    def _split_names(self) -> "DataConfig":  # split names are the default lists of voc and cityscapes
        if self.layout != "folder":
            self.train_list, self.test_list = self.train_list or "train", self.test_list or "val"
        return self


class TrainConfig(_Section):
    """``train:`` section. Defaults are the LargeFOV ``solver.prototxt`` and ``train.prototxt``.

    ``iterations`` (Caffe ``max_iter``) of ``batch_size`` crops, gradients accumulated over ``iter_size``
    (Caffe's iter_size); lr ``base_lr`` with ``lr_policy`` ``step`` (x ``gamma`` every ``step_size``) or
    ``poly`` (v3: (1 - it/max)^``power``); ``momentum``, ``weight_decay``; lr x1/x2 weights/biases, x10/x20
    for the classifier (``classifier_lr_mult``). ``lr_mult``: per layer group multipliers that override
    those, an ordered mapping of layer-name glob patterns (Caffe names for v1: ``conv1_1`` ... ``fc8``,
    ``data_conv`` ... ``pool4_ms``; module paths for v3) to ``[weight, bias]`` (Caffe ``blobs_lr``), first
    match wins, 0 freezes (the MSc experiments: the trunk frozen, the branches x1 / x2; see
    ``engine.solver.caffe_param_groups``; the train stage checks that each pattern matches a layer of the
    model before the run starts, ``stages.train.check_lr_mult``). ``label_mode``: ``shrink`` (v1: labels
    sampled at the score-map positions, INTERP shrink_factor 8) or ``upsample`` (v3: logits upsampled to the
    crop). ``scale_range``: random rescaling (v3: [0.5, 2.0]). ``batchnorm``: ``finetune`` or ``frozen`` (v3
    models). ``output_stride``: v3 training output_stride (null: the model's). ``iterations: 0`` skips
    training and tests the initial weights.

    How the work is done (never what it computes, except ``precision``): ``num_workers`` DataLoader
    worker processes (null: from the core count; 0 loads in the main process); ``precision`` ``fp32``
    (default, the release), ``bf16`` or ``fp16`` (autocast; a GradScaler for fp16); ``compile`` wraps
    the model in ``torch.compile``; ``channels_last`` memory format; ``sync_batchnorm`` (v3/v3+ under
    DDP); ``tensorboard`` logs loss, lr and predictions (needs the ``tensorboard`` extra).
    """

    iterations: StrictInt = _limited(6000, "be positive", ge=0)
    batch_size: StrictInt = _limited(30, ge=1)
    iter_size: StrictInt = _limited(1, ge=1)
    crop_size: Optional[StrictInt] = _limited(None, "be a positive number of pixels (or null: the release's crop)",
                                              ge=1)
    mirror: StrictBool = True
    base_lr: Float = _limited(0.001, gt=0)
    lr_policy: Literal["step", "poly"] = "step"
    gamma: Float = 0.1
    step_size: StrictInt = _limited(2000, "be positive", ge=1)
    power: Float = 0.9
    momentum: Float = 0.9
    weight_decay: Float = 0.0005
    classifier_lr_mult: Float = 10.0
    lr_mult: Optional[dict[StrictStr, Any]] = None
    label_mode: Literal["shrink", "upsample"] = "shrink"
    scale_range: Optional[list[Float]] = None
    batchnorm: Literal["finetune", "frozen"] = "finetune"
    output_stride: Optional[Stride] = None
    checkpoint_every: StrictInt = _limited(2000, "be positive", ge=1)
    log_every: StrictInt = _limited(10, "be positive", ge=1)
    num_workers: Optional[StrictInt] = _limited(
        None, "be >= 0 loader processes (0: in the main process; null: from the core count)", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: StrictBool = False
    channels_last: StrictBool = False
    sync_batchnorm: StrictBool = False
    tensorboard: StrictBool = False

    @field_validator("lr_mult")
    @classmethod
    def _lr_mult_values(cls, value: Optional[dict]) -> Optional[dict]:
        for pattern, mults in (value or {}).items():  # the values as given: they are fingerprinted
            if not (isinstance(mults, list) and len(mults) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in mults)):
                raise problem(f"must be [weight_mult, bias_mult], two numbers >= 0, got {mults!r}", sub=pattern)
        return value

    @field_validator("scale_range")
    @classmethod
    def _min_max(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
            raise problem(f"must be [min, max] with 0 < min <= max, got {value}")
        return value


class TestConfig(_Section):
    """``test:`` section. ``size``: the test padding (513; 514 for ``deeplab``; null: the model's).
    ``scales``/``flip``: multi-scale and left-right flip inference (v3; probabilities averaged).
    ``score_source``: ``network`` or ``degraded-gt`` (a DIAGNOSTIC source of DCNN-like scores made from
    degraded ground truth, for working on the CRF without a trained network; labelled in every output).
    ``output_stride``: v3 evaluation output_stride (null: the model's). ``batch_size`` images per
    forward (each padded to ``size``, so batching is exact), ``num_workers`` loader processes (null:
    from the core count), ``precision`` ``fp32`` (default) / ``bf16`` / ``fp16`` autocast,
    ``compile`` and ``channels_last`` as in ``train``.
    """

    size: Optional[StrictInt] = _limited(None, "be a positive number of pixels (or null: the release's test size)",
                                         ge=1)
    scales: list[Annotated[Float, Field(gt=0)]] = _limited([1.0], "be a non-empty list of positive factors",
                                                           min_length=1)
    flip: StrictBool = False
    score_source: Literal["network", "degraded-gt"] = "network"
    output_stride: Optional[Stride] = None
    batch_size: StrictInt = _limited(1, ge=1)
    num_workers: Optional[StrictInt] = _limited(
        None, "be >= 0 loader processes (0: in the main process; null: from the core count)", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: StrictBool = False
    channels_last: StrictBool = False


class CRFConfig(_Section):
    """``crf:`` section: the fully connected CRF (paper Sec. 4.2) run on every test image.

    ``params`` (``crf.CRFParams``; in YAML a mapping, keys left out keep these values) default to the
    release's LargeFOV ``run_densecrf.sh`` values (w1 4, sigma_alpha 49, sigma_beta 5, w2 3, sigma_gamma 3,
    10 iterations). When ``use_search`` is true and the run's ``crf_search`` stage has found best
    parameters, those are used instead, and with ``use_learned`` its fitted ones when it fitted any
    (``crf_search.learn``, ``learned.json``; the report says which). ``backend``: ``auto`` (the torch
    backend when it is installed and the inputs fit ``memory_mb``, else pydensecrf; the choice is
    recorded), ``pydensecrf`` (the reference) or ``torch``; ``device`` of the torch backend;
    ``workers`` CPU processes (null: ``crf.pool.default_workers``, one single-threaded process per core
    on CPU); ``memory_mb`` the budget that chooses the backend and bounds a torch batch (null: a fixed
    4096 MiB, never this machine's memory).
    """

    enabled: StrictBool = True
    params: Params = RELEASE_LARGEFOV
    use_search: StrictBool = True
    use_learned: StrictBool = True
    backend: Literal["auto", "pydensecrf", "torch"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    workers: Optional[StrictInt] = _limited(
        None, "be >= 1 worker processes (or null: one per core)", ge=1)
    memory_mb: Optional[StrictInt] = _limited(
        None, "be a positive number of MB (or null: the device's default)", ge=1)


class CRFSearchConfig(_Section):
    """``crf_search:`` section: the paper's coarse-to-fine cross-validation of w1, sigma_alpha, sigma_beta
    (Sec. 5: w2 = 3, sigma_gamma = 3 fixed; w1 in [5, 10], sigma_alpha in [50:10:100], sigma_beta in
    [3:1:10]; 100 val images drawn with a fixed seed).

    The stage's own keys are ``enabled``, ``num_images``, ``seed`` (which images) and ``learn`` (which of
    ``w1``, ``w2``, ``compatibility`` ``crf.fit_crf`` fits from the best, each once; [] the grid alone); every
    other key of the section is a field of ``crf.search.SearchConfig`` (``w1``, ``sigma_alpha``, ``sigma_beta``,
    ``w2``, ``sigma_gamma``, ``iterations``, ``rounds``, ``shrink``, ``objective`` (``miou`` or
    ``trimap_miou``), ``trimap_width``, ``backend`` (``auto``, ``torch``, ``pydensecrf``), ``device``,
    ``workers``, ``memory_mb``, ``strategy`` (``grid``, the paper's, or ``halving``: successive halving),
    ``eta``, ``min_images``, ``halving_seed``, ``halving_floor``), checked by it and kept as ``search``: the one definition
    of the search's configuration.
    """

    enabled: StrictBool = False
    num_images: StrictInt = _limited(100, ge=1)
    seed: StrictInt = 0
    learn: Learnable = Field(default_factory=list)
    search: InstanceOf[SearchConfig] = Field(default_factory=SearchConfig)

    @staticmethod
    def search_keys() -> list[str]:
        """The ``SearchConfig`` fields the section may set: all but ``label`` (the stage says where the
        scores come from) and ``cache_mb`` (a machine's memory, not an experiment's)."""
        return [f for f in SearchConfig.__dataclass_fields__ if f not in ("label", "cache_mb")]

    @classmethod
    def known_keys(cls) -> list[str]:
        """The stage's keys and ``search_keys()``: the section is flat in YAML."""
        return [k for k in cls.model_fields if k != "search"] + cls.search_keys()

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, values: Any) -> Any:
        """The flat YAML mapping: the stage's keys stay, the rest goes through ``SearchConfig``'s checks."""
        if not isinstance(values, dict) or isinstance(values.get("search"), SearchConfig):
            return values  # not a mapping (the section's message says so), or built in code
        unknown_keys = [k for k in values if k not in cls.known_keys()]
        if unknown_keys:
            raise unknown(unknown_keys)
        search_keys = set(cls.search_keys())
        try:  # SearchConfig checks its own fields (types and ranges) with messages naming them
            search = SearchConfig.from_dict({k: v for k, v in values.items() if k in search_keys})
        except (TypeError, ValueError) as exc:
            raise problem(f"is invalid: {str(exc).replace('SearchConfig.', 'crf_search.')}") from exc
        return {**{k: v for k, v in values.items() if k not in search_keys}, "search": search}


class EvaluationConfig(_Section):
    """``evaluation:`` section: trimap band widths (pixels; paper Fig. 5 uses 1..40)."""

    trimap_widths: list[Annotated[StrictInt, Field(ge=1)]] = _limited(
        list(range(1, 41)), "be positive pixel widths", min_length=1)


#: The stages in pipeline order (paper Fig. 1: DCNN -> bilinear upsampling -> CRF, then the evaluation).
STAGES: tuple[str, ...] = ("train", "test", "crf_search", "crf", "evaluate")


class ExperimentConfig(_Section):
    """A whole experiment. ``output_dir``: the run folder (relative to the YAML file's folder; default
    ``./runs/<name>`` under the current folder, as mmsegmentation's work_dirs). ``tf32``: allow TF32
    matmuls/convolutions on CUDA (off: the release's fp32). ``stages``: which of train, test, crf_search,
    crf, evaluate ``deeplab run`` runs. ``source`` (not a key): the YAML file it came from."""

    name: StrictStr = "experiment"
    seed: StrictInt = 0
    output_dir: Optional[Path] = None
    device: Literal["cpu", "cuda"] = "cpu"
    tf32: StrictBool = False
    stages: list[StrictStr] = ["train", "test", "crf_search", "crf", "evaluate"]
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    test: TestConfig = Field(default_factory=TestConfig)
    crf: CRFConfig = Field(default_factory=CRFConfig)
    crf_search: CRFSearchConfig = Field(default_factory=CRFSearchConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    _source: Optional[Path] = PrivateAttr(None)
    _where: str = PrivateAttr("the experiment")

    @property
    def source(self) -> Optional[Path]:
        """The YAML file this came from (absolute), or None."""
        return self._source

    @source.setter
    def source(self, path: Optional[Path]) -> None:
        self._source = path

    @property
    def run_dir(self) -> Path:
        """The run folder (absolute)."""
        assert self.output_dir is not None
        return self.output_dir

    def key_error(self, key: str, what: str) -> ConfigError:
        """A ``ConfigError`` on the dotted ``key``, naming where its value came from (the file or the
        ``--set``), for a check made after loading (e.g. ``stages.train.check_lr_mult``)."""
        return ConfigError(f"{_at(self._where, key)}: key '{key}' {what}")


# ----------------------------------------------------------------------------------------------- loading
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


def validate(cfg: ExperimentConfig, where: str, *, check_paths: bool = True) -> None:
    """The checks the schema cannot make: model names, stages, the dataset (``data.layouts.data_problem``),
    existing paths and a writable run folder.

    Raises:
        ConfigError: naming the file and the key.
    """
    from .models import MODEL_NAMES  # late import: config stays light

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{_at(where, key)}: key '{key}' {msg}")

    if cfg.model.name not in MODEL_NAMES:
        fail("model.name", f"is {cfg.model.name!r}, not a known model ({', '.join(MODEL_NAMES)})")
    for stage in cfg.stages:
        if stage not in STAGES:
            fail("stages", f"has unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    problem_ = data_problem(cfg.data, cfg.model.num_classes, check_paths=check_paths)
    if problem_:
        fail(*problem_)
    if check_paths and cfg.model.init is not None and not cfg.model.init.is_file():
        fail("model.init", f"points to {cfg.model.init}, which does not exist")
    problem_ = _output_dir_problem(cfg.run_dir) if check_paths else None
    if problem_:
        fail("output_dir", f"points to {cfg.run_dir}, {problem_}")


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
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(schema_error_message(exc, ExperimentConfig, raw, where)) from None
    base = path.resolve().parent
    cfg.source, cfg._where = path.resolve(), where
    cfg.data.root = _resolve(cfg.data.root, base)
    cfg.model.init = _resolve(cfg.model.init, base)
    resolve_lists(cfg.data, base)  # list files, relative to the YAML's folder
    cfg.output_dir = _resolve(cfg.output_dir, base) if cfg.output_dir else (Path.cwd() / "runs" / cfg.name).resolve()
    validate(cfg, where, check_paths=check_paths)
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as plain YAML-friendly data (paths as strings; the ``crf_search`` section flat,
    as written); the keys in the schema's order."""

    def plain(v: Any) -> Any:
        if isinstance(v, CRFParams):
            return v.to_dict()
        if isinstance(v, CRFSearchConfig):
            search = {k: plain(getattr(v.search, k)) for k in CRFSearchConfig.search_keys()}
            return {**{k: plain(getattr(v, k)) for k in type(v).model_fields if k != "search"}, **search}
        if isinstance(v, BaseModel):
            return {k: plain(getattr(v, k)) for k in type(v).model_fields}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)
