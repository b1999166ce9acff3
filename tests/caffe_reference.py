"""Independent reference interpreter for the deeplab-public (Caffe, 2014-2016) release's prototxts.

Test-support module, not a test file. It reads the release's own ``train.prototxt`` / ``test.prototxt``
(old Caffe "V1" text syntax) and runs their forward pass with Caffe's definitions, so the project's model
can be checked against the release instead of against itself. It deliberately imports nothing from the
project's ``deeplab_v1`` package; only ``torch`` and ``numpy``. Convolution uses ``F.conv2d`` (identical
arithmetic); pooling and interpolation are written out here so that the output-size rounding, the
average-pooling divisor and the bilinear sample positions are Caffe's and not torch's.

Sources followed (deeplab-public / BVLC Caffe of the same era):

- ``src/caffe/proto/caffe.proto``: field names and defaults (``ConvolutionParameter`` pad 0, stride 1,
  hole 1, bias_term true; ``PoolingParameter`` pool MAX, pad 0, stride 1; ``EltwiseParameter`` operation
  SUM; ``InterpParameter`` / ``PaddingParameter`` pad_beg, pad_end 0; ``NetStateRule`` include/exclude;
  ``LayerParameter.blobs_lr`` / ``weight_decay`` repeated, one per blob).
- ``conv_layer.cpp`` + ``im2col.cpp`` (with deeplab's ``hole``): ``k_eff = k + (k - 1)(hole - 1)``,
  ``out = (H + 2 pad - k_eff) / stride + 1`` (integer division, i.e. floor).
- ``pooling_layer.cpp``: ``out = ceil((H + 2 pad - k) / stride) + 1``, then, when pad > 0 and
  ``(out - 1) * stride >= H + pad``, ``out -= 1``; MAX over the window clipped to the image; AVE sums
  the clipped window and divides by ``(hend - hstart) * (wend - wstart)`` with
  ``hend = min(hstart + k, H + pad)`` taken *before* clipping.
- ``interp_layer.cpp`` + ``util/interp.cpp`` (``caffe_cpu_interp2``): corner-aligned bilinear.
- ``padding_layer.cpp``: per-side pad (>= 0, zero fill) or crop (<= 0); mixed signs are fatal.
- ``relu_layer.cpp`` (negative_slope), ``dropout_layer.cpp``, ``eltwise_layer.cpp``.

Blobs are ``torch.float32`` tensors laid out (N, C, H, W) exactly like Caffe's; sizes are in pixels of
the blob concerned. ``data`` is BGR, 0..255 with the per-channel mean already subtracted (what Caffe's
``IMAGE_SEG_DATA`` + data transformer produce); ``label`` is (N, 1, H, W) class indices as floats
(255 = ignore), as Caffe stores labels.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_VARIABLES",
    "SKIPPED_TYPES",
    "Unresolved",
    "parse_prototxt",
    "conv_output_size",
    "pool_output_size",
    "interp_output_size",
    "caffe_conv",
    "caffe_pool",
    "caffe_interp2",
    "caffe_interp",
    "caffe_padding",
    "CaffeReferenceNet",
    "random_weights",
]

#: Placeholder values the release's scripts substitute before running Caffe (``run_pascal.sh``).
DEFAULT_VARIABLES: dict[str, str] = {"NUM_LABELS": "21", "EXP": "voc12"}

#: Layer types that produce no blob this interpreter needs (losses, metrics, writers, CRF, display).
#: Any type ending in ``_LOSS`` is skipped too.
SKIPPED_TYPES = frozenset({"SOFTMAX_LOSS", "SEG_ACCURACY", "ACCURACY", "MAT_WRITE", "SILENCE", "DENSE_CRF",
                           "IMSHOW"})

#: Data layer types: they provide ``data`` (and ``label``) from the arguments of ``forward``.
DATA_TYPES = frozenset({"IMAGE_SEG_DATA", "IMAGE_DATA", "DATA", "MEMORY_DATA"})

#: Fields that caffe.proto declares ``repeated``: always lists in the parser's output, even when they
#: appear once. Any other key that appears more than once also becomes a list.
REPEATED_FIELDS = frozenset({"bottom", "top", "blobs_lr", "weight_decay", "include", "exclude", "mean_value",
                             "coeff", "loss_weight", "param", "stage", "not_stage", "blobs", "input",
                             "input_dim", "dim"})

_FLT_MAX = float(np.finfo(np.float32).max)


# ============================================================================ prototxt parser


class Unresolved(str):
    """A value (or part of one) that still holds ``${NAME}`` placeholders with no substitution.

    It is kept as a string so the parse succeeds (the release's data and MAT_WRITE layers hold
    ``${DATA_ROOT}``, ``${TEST_SET}``, ``${FEATURE_DIR}`` ...); the interpreter raises ``ValueError``
    naming the placeholders as soon as it actually needs such a value.
    """

    placeholders: tuple[str, ...]

    def __new__(cls, text: str, placeholders: Iterable[str]):
        obj = super().__new__(cls, text)
        obj.placeholders = tuple(placeholders)
        return obj


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<comment>\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<open>\{)
      | (?P<close>\})
      | (?P<colon>:)
      | (?P<word>(?:\$\{[A-Za-z_][A-Za-z0-9_]*\}|[^\s{}:"'\#])+)
    """,
    re.VERBOSE,
)
_INT = re.compile(r"[-+]?\d+\Z")
_FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?[fF]?\Z")


def _substitute(text: str, variables: dict[str, str]) -> str:
    missing: list[str] = []

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name in variables and variables[name] is not None:
            return str(variables[name])
        missing.append(name)
        return m.group(0)

    out = _PLACEHOLDER.sub(repl, text)
    return Unresolved(out, missing) if missing else out


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _scalar(token_kind: str, text: str, variables: dict[str, str]) -> Any:
    if token_kind == "string":
        return _substitute(_unescape(text[1:-1]), variables)
    value = _substitute(text, variables)
    if isinstance(value, Unresolved):
        return value
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value.rstrip("fF"))
    if value in ("true", "True"):
        return True
    if value in ("false", "False"):
        return False
    return value  # enum identifier: MAX, CONVOLUTION, TRAIN ...


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"prototxt: cannot tokenize at line {line}: {text[pos:pos + 30]!r}")
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            tokens.append((kind, m.group(0), line))
        line += m.group(0).count("\n")
        pos = m.end()
    return tokens


def _add(msg: dict, key: str, value: Any) -> None:
    if key in msg:
        if not isinstance(msg[key], list):
            msg[key] = [msg[key]]
        msg[key].append(value)
    else:
        msg[key] = [value] if key in REPEATED_FIELDS else value


def _parse_message(tokens: list, i: int, variables: dict[str, str], closing: bool) -> tuple[dict, int]:
    msg: dict[str, Any] = {}
    while i < len(tokens):
        kind, text, line = tokens[i]
        if kind == "close":
            if not closing:
                raise ValueError(f"prototxt: unbalanced '}}' at line {line}")
            return msg, i + 1
        if kind != "word":
            raise ValueError(f"prototxt: expected a field name at line {line}, got {text!r}")
        key = text
        i += 1
        if i < len(tokens) and tokens[i][0] == "colon":
            i += 1
        if i >= len(tokens):
            raise ValueError(f"prototxt: missing value for {key!r} at line {line}")
        kind, text, vline = tokens[i]
        if kind == "open":
            sub, i = _parse_message(tokens, i + 1, variables, closing=True)
            _add(msg, key, sub)
        elif kind in ("word", "string"):
            _add(msg, key, _scalar(kind, text, variables))
            i += 1
        else:
            raise ValueError(f"prototxt: bad value for {key!r} at line {vline}: {text!r}")
    if closing:
        raise ValueError("prototxt: unexpected end of input (missing '}')")
    return msg, i


def parse_prototxt(path_or_text: str | Path, variables: dict[str, str] | None = None) -> list[dict]:
    """Parse protobuf text format as used by the release and return its ``layers`` blocks in file order.

    ``path_or_text``: a ``Path``, a path string of an existing file, or the prototxt text itself.
    ``variables``: ``${NAME}`` substitutions, merged over :data:`DEFAULT_VARIABLES`
    (``NUM_LABELS=21``, ``EXP=voc12``). Substitution happens inside quoted strings and bare values;
    a bare value that becomes a number is converted (``num_output: ${NUM_LABELS}`` -> ``21``). A value
    whose placeholder has no substitution is kept as an :class:`Unresolved` string; the interpreter raises
    ``ValueError`` naming it when (and only when) it needs that value.

    Syntax handled: ``key: value`` (ints, floats, ``true``/``false``, bare enums, quoted strings),
    nested ``key { ... }`` and ``key: { ... }`` blocks (the release writes ``include: { phase: TEST }``),
    ``#`` comments to end of line (outside strings). Each layer is a nested dict; fields caffe.proto
    declares repeated (:data:`REPEATED_FIELDS`: ``bottom``, ``top``, ``blobs_lr``, ``include`` ...) are
    always lists, any other key that appears more than once becomes a list in file order.
    Top-level keys other than ``layers`` (e.g. the net ``name``) are dropped.
    """
    if isinstance(path_or_text, Path):
        text = path_or_text.read_text()
    elif "\n" not in path_or_text and "{" not in path_or_text and Path(path_or_text).is_file():
        text = Path(path_or_text).read_text()
    else:
        text = path_or_text
    merged = dict(DEFAULT_VARIABLES)
    if variables:
        merged.update(variables)
    msg, _ = _parse_message(_tokenize(text), 0, merged, closing=False)
    layers = msg.get("layers", [])
    return list(layers) if isinstance(layers, list) else [layers]


# ============================================================================ Caffe layer arithmetic


def conv_output_size(size: int, kernel: int, stride: int = 1, pad: int = 0, hole: int = 1) -> int:
    """Caffe/deeplab ``ConvolutionLayer::Reshape``: ``(size + 2 pad - k_eff) / stride + 1`` (floor),
    ``k_eff = kernel + (kernel - 1) * (hole - 1)``. Sizes in pixels of the input / output blob."""
    k_eff = kernel + (kernel - 1) * (hole - 1)
    return (size + 2 * pad - k_eff) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
    """Caffe ``PoolingLayer::Reshape``: ``ceil((size + 2 pad - kernel) / stride) + 1``; then, if pad > 0
    and the last window would start at or beyond ``size + pad`` (entirely in the padding), one less."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1  # exact integer ceil
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def interp_output_size(size: int, zoom_factor: int | None = None, shrink_factor: int | None = None,
                       explicit: int | None = None, pad_beg: int = 0, pad_end: int = 0) -> int:
    """deeplab-public ``InterpLayer::Reshape`` along one axis.

    ``size_eff = size + pad_beg + pad_end`` (pads are <= 0: crops). Caffe's order of cases: shrink only
    -> ``(size_eff - 1) / s + 1`` (integer division); zoom only -> ``size_eff + (size_eff - 1)(z - 1)``;
    explicit height/width -> that; shrink and zoom -> shrink first, then zoom.
    """
    eff = size + pad_beg + pad_end
    if shrink_factor is not None and zoom_factor is None:
        if shrink_factor < 1:
            raise ValueError("INTERP: shrink factor must be positive")
        return (eff - 1) // shrink_factor + 1
    if zoom_factor is not None and shrink_factor is None:
        if zoom_factor < 1:
            raise ValueError("INTERP: zoom factor must be positive")
        return eff + (eff - 1) * (zoom_factor - 1)
    if explicit is not None:
        return explicit
    if shrink_factor is not None and zoom_factor is not None:
        out = (eff - 1) // shrink_factor + 1
        return out + (out - 1) * (zoom_factor - 1)
    raise ValueError("INTERP: give zoom_factor, shrink_factor, or height and width")


def caffe_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int] = (1, 1),
               pad: tuple[int, int] = (0, 0), hole: tuple[int, int] = (1, 1), group: int = 1) -> torch.Tensor:
    """Caffe convolution with deeplab's ``hole`` (= dilation): (N, C, H, W) -> (N, O, H', W'), H' by
    :func:`conv_output_size`; zero padding; ``weight`` (O, C / group, kh, kw), ``bias`` (O,) or None.
    ``F.conv2d`` computes the same sum as Caffe's im2col + GEMM (to float rounding)."""
    return F.conv2d(x, weight, bias, stride=stride, padding=pad, dilation=hole, groups=group)


def caffe_pool(x: torch.Tensor, method: str, kernel: tuple[int, int], stride: tuple[int, int],
               pad: tuple[int, int]) -> torch.Tensor:
    """Caffe ``PoolingLayer::Forward_cpu`` for MAX and AVE: (N, C, H, W) -> (N, C, H', W'),
    H' by :func:`pool_output_size`.

    Window of output row ``ph``: ``hstart = ph * stride - pad``. MAX: max over rows
    ``[max(hstart, 0), min(hstart + k, H))`` (padding never wins; Caffe starts from ``-FLT_MAX``, so the
    result is clamped below at ``-FLT_MAX``). AVE: sum over the same clipped window divided by
    ``(hend - hstart) * (wend - wstart)`` with ``hend = min(hstart + k, H + pad)`` computed before
    clipping: padding inside ``[-pad, H + pad)`` counts in the divisor, the part of a ceil-mode window
    beyond ``H + pad`` does not. Written with strided slices, not ``F.max_pool2d`` / ``F.avg_pool2d``.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = pool_output_size(h, kh, sh, ph), pool_output_size(w, kw, sw, pw)
    # Pad far enough that every window (also a ceil-mode one past the end) is inside the padded tensor.
    extra_h = max(0, (oh - 1) * sh - ph + kh - h)
    extra_w = max(0, (ow - 1) * sw - pw + kw - w)
    if method == "MAX":
        xp = F.pad(x, (pw, extra_w, ph, extra_h), value=float("-inf"))
        out = None
        for dy in range(kh):
            for dx in range(kw):
                v = xp[:, :, dy:dy + (oh - 1) * sh + 1:sh, dx:dx + (ow - 1) * sw + 1:sw]
                out = v if out is None else torch.maximum(out, v)
        return out.clamp_min(-_FLT_MAX)
    if method == "AVE":
        xp = F.pad(x, (pw, extra_w, ph, extra_h), value=0.0)
        acc = torch.zeros((n, c, oh, ow), dtype=x.dtype, device=x.device)
        for dy in range(kh):
            for dx in range(kw):
                acc = acc + xp[:, :, dy:dy + (oh - 1) * sh + 1:sh, dx:dx + (ow - 1) * sw + 1:sw]

        def sizes(o: int, s: int, p: int, k: int, length: int) -> torch.Tensor:
            start = torch.arange(o) * s - p
            end = torch.minimum(start + k, torch.tensor(length + p))
            return (end - start).to(x.dtype)

        divisor = sizes(oh, sh, ph, kh, h)[:, None] * sizes(ow, sw, pw, kw, w)[None, :]
        return acc / divisor.to(x.device)
    raise NotImplementedError(f"POOLING method {method!r} (only MAX and AVE are implemented)")


def _interp_axis(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample indices and weights of ``caffe_cpu_interp2`` along one axis, in Caffe's float32 arithmetic:
    ``r = float(size_in - 1) / (size_out - 1)`` (0 if size_out == 1), ``i1r = r * i``, ``i1 = int(i1r)``,
    ``i1p = 1 if i1 < size_in - 1 else 0``, ``lambda1 = i1r - i1``, ``lambda0 = 1 - lambda1``.
    Returns (i1, i1 + i1p, lambda0, lambda1)."""
    r = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0.0)
    i1r = (r * np.arange(size_out, dtype=np.float32)).astype(np.float32)
    i1 = i1r.astype(np.int64)  # C++ float -> int truncation (values are >= 0)
    i1p = (i1 < size_in - 1).astype(np.int64)
    lam1 = (i1r - i1.astype(np.float32)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return (torch.from_numpy(i1), torch.from_numpy(i1 + i1p), torch.from_numpy(lam0), torch.from_numpy(lam1))


def caffe_interp2(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``caffe_cpu_interp2<Dtype, false>``: corner-aligned bilinear resize (N, C, H1, W1) -> (N, C, H2, W2).

    Output (h2, w2) = ``l0h * (l0w * x[h1, w1] + l1w * x[h1, w1 + w1p])
    + l1h * (l0w * x[h1 + h1p, w1] + l1w * x[h1 + h1p, w1 + w1p])`` with the indices and weights of
    :func:`_interp_axis` (same grouping of the products as Caffe). Equal sizes are copied, as in Caffe.
    Built from explicit index / weight tensors, not ``F.interpolate``.
    """
    h1, w1 = x.shape[-2:]
    if (h1, w1) == (height, width):
        return x.clone()
    hi0, hi1, hl0, hl1 = _interp_axis(h1, height)
    wi0, wi1, wl0, wl1 = _interp_axis(w1, width)
    dev, dt = x.device, x.dtype
    hi0, hi1, wi0, wi1 = hi0.to(dev), hi1.to(dev), wi0.to(dev), wi1.to(dev)
    hl0, hl1 = hl0.to(dev, dt)[:, None], hl1.to(dev, dt)[:, None]
    wl0, wl1 = wl0.to(dev, dt), wl1.to(dev, dt)
    top, bot = x[..., hi0, :], x[..., hi1, :]
    a = wl0 * top[..., wi0] + wl1 * top[..., wi1]
    b = wl0 * bot[..., wi0] + wl1 * bot[..., wi1]
    return hl0 * a + hl1 * b


def caffe_interp(x: torch.Tensor, zoom_factor: int | None = None, shrink_factor: int | None = None,
                 height: int | None = None, width: int | None = None, pad_beg: int = 0,
                 pad_end: int = 0) -> torch.Tensor:
    """deeplab-public ``INTERP`` layer: crop by ``-pad_beg`` / ``-pad_end`` pixels at the begin / end of
    both axes (pads must be <= 0), size the output by :func:`interp_output_size`, resample with
    :func:`caffe_interp2` (the effective, cropped input is what is corner-aligned to the output).

    On a label blob (``label_shrink`` in train.prototxt) the same bilinear formula runs; for the release's
    crops (321 with shrink 8; 306 with pad_beg -1 and shrink 8) every sample position is an integer
    (lambda = 0), so labels are copied from rows / columns ``-pad_beg + 8 i``, never blended.
    """
    if pad_beg > 0 or pad_end > 0:
        raise ValueError("INTERP: only non-positive pad_beg / pad_end (cropping) are supported, as in Caffe")
    h, w = x.shape[-2:]
    x_eff = x[..., -pad_beg:h + pad_end, -pad_beg:w + pad_end]
    if height is None and width is not None or width is None and height is not None:
        raise ValueError("INTERP: height and width must be given together")
    oh = interp_output_size(h, zoom_factor, shrink_factor, height, pad_beg, pad_end)
    ow = interp_output_size(w, zoom_factor, shrink_factor, width, pad_beg, pad_end)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"INTERP: output size {oh}x{ow} must be positive")
    return caffe_interp2(x_eff, oh, ow)


def caffe_padding(x: torch.Tensor, pad_beg: int, pad_end: int) -> torch.Tensor:
    """deeplab-public ``PADDING`` layer on both spatial axes: ``top[h, w] = bottom[h - pad_beg, w - pad_beg]``
    where in range, else 0. Both pads >= 0 (zero padding) or both <= 0 (cropping); mixed signs are
    fatal in Caffe and raise ``ValueError`` here. Output size ``H + pad_beg + pad_end``."""
    if not (pad_beg >= 0 and pad_end >= 0 or pad_beg <= 0 and pad_end <= 0):
        raise ValueError("PADDING: pad_beg and pad_end must both be >= 0 or both be <= 0")
    h, w = x.shape[-2:]
    if h + pad_beg + pad_end <= 0 or w + pad_beg + pad_end <= 0:
        raise ValueError("PADDING: output size must be positive")
    if pad_beg >= 0:
        return F.pad(x, (pad_beg, pad_end, pad_beg, pad_end), value=0.0)
    return x[..., -pad_beg:h + pad_end, -pad_beg:w + pad_end].clone()


# ============================================================================ the network


def _phase_ok(layer: dict, phase: str) -> bool:
    """Caffe ``Net::StateMeetsRule`` restricted to the phase: with include rules the layer is kept if any
    rule's phase matches (a rule without phase matches any phase); with exclude rules it is dropped if
    any matches. Levels and stages are not modelled."""
    def meets(rule: dict) -> bool:
        return "phase" not in rule or rule["phase"] == phase

    include, exclude = layer.get("include", []), layer.get("exclude", [])
    if include:
        return any(meets(r) for r in include)
    if exclude:
        return not any(meets(r) for r in exclude)
    return True


class CaffeReferenceNet:
    """A Caffe net of one phase, built from :func:`parse_prototxt` output, run with Caffe's forward rules.

    ``layers``: parsed layer dicts; ``phase``: ``"TRAIN"`` or ``"TEST"`` (layers whose include / exclude
    rules do not meet it are left out, as Caffe does); ``weights``: ``{layer name: (W, b)}`` for every
    CONVOLUTION layer, ``W`` (out, in, kh, kw) and ``b`` (out,) (``b`` may be None where bias_term is
    false); may be omitted to use only the shape / definition helpers.

    Interpreted types: data layers (``IMAGE_SEG_DATA`` ...: provide ``data`` and, when given, ``label``),
    CONVOLUTION, POOLING (MAX, AVE), RELU, DROPOUT, ELTWISE (SUM with coeff, PROD, MAX), INTERP, PADDING.
    DROPOUT is the identity in both phases: this interpreter exists for deterministic comparison, so in
    TRAIN phase it is Caffe's test-time behaviour, not a random mask with 1 / (1 - ratio) scaling.
    Skipped: :data:`SKIPPED_TYPES` and ``*_LOSS`` (no blob is produced). Any other type raises
    ``NotImplementedError`` naming the layer at construction.
    """

    def __init__(self, layers: list[dict], phase: str = "TEST",
                 weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None):
        if phase not in ("TRAIN", "TEST"):
            raise ValueError(f"phase must be 'TRAIN' or 'TEST', not {phase!r}")
        self.phase = phase
        self.layers = [layer for layer in layers if _phase_ok(layer, phase)]
        self.weights = dict(weights) if weights else {}
        self._data_tops = ["data", "label"]
        data_layers = [layer for layer in self.layers if layer.get("type") in DATA_TYPES]
        if data_layers:
            tops = [self._str(data_layers[0], t) for t in data_layers[0].get("top", [])]
            self._data_tops = (tops + ["data", "label"][len(tops):])[:max(2, len(tops))]
        self._channels = self._propagate_channels()

    # ------------------------------------------------------------------ value access with placeholder check

    @staticmethod
    def _check(layer: dict, value: Any) -> Any:
        if isinstance(value, Unresolved):
            names = ", ".join("${%s}" % p for p in value.placeholders)
            raise ValueError(f"layer {layer.get('name')!r}: unresolved placeholder {names} in value {value!r}; "
                             f"pass it in parse_prototxt(variables=...)")
        return value

    def _str(self, layer: dict, value: Any) -> str:
        return str(self._check(layer, value))

    def _name(self, layer: dict) -> str:
        return self._str(layer, layer.get("name", "<unnamed>"))

    def _bottoms(self, layer: dict) -> list[str]:
        return [self._str(layer, b) for b in layer.get("bottom", [])]

    def _tops(self, layer: dict) -> list[str]:
        return [self._str(layer, t) for t in layer.get("top", [])]

    def _int(self, layer: dict, block: dict, key: str, default: int | None = None) -> int | None:
        if key not in block:
            return default
        value = self._check(layer, block[key])
        if isinstance(value, list):
            raise ValueError(f"layer {self._name(layer)!r}: {key} given more than once")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"layer {self._name(layer)!r}: {key} = {value!r} is not an integer")
        return int(value)

    def _hw(self, layer: dict, block: dict, key: str, default: int | None) -> tuple[int, int]:
        """``key`` or ``key_h`` + ``key_w`` (caffe.proto's square / non-square forms)."""
        if f"{key}_h" in block or f"{key}_w" in block:
            return (self._int(layer, block, f"{key}_h", default), self._int(layer, block, f"{key}_w", default))
        v = self._int(layer, block, key, default)
        if v is None:
            raise ValueError(f"layer {self._name(layer)!r}: {key} is required")
        return (v, v)

    def _kind(self, layer: dict) -> str:
        t = self._str(layer, layer.get("type", ""))
        if t in DATA_TYPES:
            return "data"
        if t in SKIPPED_TYPES or t.endswith("_LOSS"):
            return "skip"
        if t in ("CONVOLUTION", "POOLING", "RELU", "DROPOUT", "ELTWISE", "INTERP", "PADDING"):
            return t
        raise NotImplementedError(f"layer {self._name(layer)!r}: type {t!r} is not implemented by the Caffe "
                                  f"reference interpreter")

    def _conv_geometry(self, layer: dict) -> dict:
        p = layer.get("convolution_param", {})
        g = {
            "num_output": self._int(layer, p, "num_output"),
            "kernel": self._hw(layer, p, "kernel", None) if "kernel_h" in p or "kernel_w" in p
            else self._hw(layer, p, "kernel_size", None),
            "stride": self._hw(layer, p, "stride", 1),
            "pad": self._hw(layer, p, "pad", 0),
            "hole": self._hw(layer, p, "hole", 1),
            "group": self._int(layer, p, "group", 1),
            "bias_term": bool(self._check(layer, p.get("bias_term", True))),
        }
        if g["num_output"] is None:
            raise ValueError(f"layer {self._name(layer)!r}: convolution_param.num_output is required")
        return g

    def _pool_geometry(self, layer: dict) -> dict:
        p = layer.get("pooling_param", {})
        if self._check(layer, p.get("global_pooling", False)):
            raise NotImplementedError(f"layer {self._name(layer)!r}: global_pooling")
        kernel = self._hw(layer, p, "kernel", None) if "kernel_h" in p or "kernel_w" in p \
            else self._hw(layer, p, "kernel_size", None)
        return {"method": self._str(layer, p.get("pool", "MAX")), "kernel": kernel,
                "stride": self._hw(layer, p, "stride", 1), "pad": self._hw(layer, p, "pad", 0)}

    def _interp_args(self, layer: dict) -> dict:
        p = layer.get("interp_param", {})
        return {"zoom_factor": self._int(layer, p, "zoom_factor"),
                "shrink_factor": self._int(layer, p, "shrink_factor"),
                "height": self._int(layer, p, "height"), "width": self._int(layer, p, "width"),
                "pad_beg": self._int(layer, p, "pad_beg", 0), "pad_end": self._int(layer, p, "pad_end", 0)}

    def _padding_args(self, layer: dict) -> tuple[int, int]:
        p = layer.get("padding_param", {})
        return self._int(layer, p, "pad_beg", 0), self._int(layer, p, "pad_end", 0)

    def _eltwise_args(self, layer: dict, n_bottoms: int) -> tuple[str, list[float]]:
        p = layer.get("eltwise_param", {})
        op = self._str(layer, p.get("operation", "SUM"))
        coeff = [float(self._check(layer, c)) for c in p.get("coeff", [])] or [1.0] * n_bottoms
        if len(coeff) != n_bottoms:
            raise ValueError(f"layer {self._name(layer)!r}: {len(coeff)} coeff for {n_bottoms} bottoms")
        if op != "SUM" and p.get("coeff"):
            raise ValueError(f"layer {self._name(layer)!r}: coeff is only for the SUM operation")
        if op not in ("SUM", "PROD", "MAX"):
            raise NotImplementedError(f"layer {self._name(layer)!r}: ELTWISE operation {op!r}")
        return op, coeff

    # ------------------------------------------------------------------ shape propagation

    def _propagate_channels(self) -> dict[str, int]:
        ch = {self._data_tops[0]: 3, self._data_tops[1]: 1}
        self._conv_in: dict[str, int] = {}
        for layer in self.layers:
            kind = self._kind(layer)
            if kind in ("data", "skip"):
                continue
            name, bottoms, tops = self._name(layer), self._bottoms(layer), self._tops(layer)
            for b in bottoms:
                if b not in ch:
                    raise ValueError(f"layer {name!r}: bottom blob {b!r} is produced by no earlier layer")
            if kind == "CONVOLUTION":
                g = self._conv_geometry(layer)
                if len(bottoms) != 1 or len(tops) != 1:
                    raise NotImplementedError(f"layer {name!r}: convolution with several bottoms / tops")
                self._conv_in[name] = ch[bottoms[0]]
                out = g["num_output"]
            elif kind == "ELTWISE":
                cs = {ch[b] for b in bottoms}
                if len(cs) != 1:
                    raise ValueError(f"layer {name!r}: ELTWISE bottoms have different channel counts {cs}")
                self._eltwise_args(layer, len(bottoms))
                out = cs.pop()
            else:
                out = ch[bottoms[0]]
            for t in tops:
                ch[t] = out
        return ch

    def blob_shapes(self, height: int, width: int | None = None,
                    with_label: bool = True) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of every blob for a ``data`` blob of (3, height, width), computed with Caffe's size
        rules only (no arithmetic on values). ``label`` is (1, height, width) when ``with_label``.
        Raises ``ValueError`` where Caffe's Reshape would fail (ELTWISE bottoms of different sizes)."""
        width = height if width is None else width
        shapes: dict[str, tuple[int, int, int]] = {self._data_tops[0]: (3, height, width)}
        if with_label:
            shapes[self._data_tops[1]] = (1, height, width)
        for layer in self.layers:
            kind = self._kind(layer)
            if kind in ("data", "skip"):
                continue
            name, bottoms, tops = self._name(layer), self._bottoms(layer), self._tops(layer)
            for b in bottoms:
                if b not in shapes:
                    raise ValueError(f"layer {name!r}: bottom blob {b!r} is not available")
            c, h, w = shapes[bottoms[0]]
            if kind == "CONVOLUTION":
                g = self._conv_geometry(layer)
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel"], g["stride"], g["pad"], g["hole"]
                out = (g["num_output"], conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw))
            elif kind == "POOLING":
                g = self._pool_geometry(layer)
                (kh, kw), (sh, sw), (ph, pw) = g["kernel"], g["stride"], g["pad"]
                out = (c, pool_output_size(h, kh, sh, ph), pool_output_size(w, kw, sw, pw))
            elif kind == "INTERP":
                a = self._interp_args(layer)
                z, s, pb, pe = a["zoom_factor"], a["shrink_factor"], a["pad_beg"], a["pad_end"]
                out = (c, interp_output_size(h, z, s, a["height"], pb, pe),
                       interp_output_size(w, z, s, a["width"], pb, pe))
            elif kind == "PADDING":
                pb, pe = self._padding_args(layer)
                out = (c, h + pb + pe, w + pb + pe)
            elif kind == "ELTWISE":
                if len({shapes[b] for b in bottoms}) != 1:
                    raise ValueError(f"layer {name!r}: ELTWISE bottoms have different shapes "
                                     f"{[shapes[b] for b in bottoms]}")
                out = (c, h, w)
            else:  # RELU, DROPOUT
                out = (c, h, w)
            for t in tops:
                shapes[t] = out
        return shapes

    # ------------------------------------------------------------------ definitions for tests

    def _layer(self, name: str) -> dict:
        matches = [layer for layer in self.layers if layer.get("name") == name]
        if not matches:
            raise KeyError(f"no layer named {name!r} in the {self.phase} net")
        convs = [layer for layer in matches if layer.get("type") == "CONVOLUTION"]
        return (convs or matches)[0]

    def param_layers(self) -> list[tuple[str, int, int, int | tuple[int, int]]]:
        """``(name, in_channels, out_channels, kernel)`` of every CONVOLUTION layer in net order; input
        channels by propagation from a 3-channel ``data`` blob; ``kernel`` an int when square."""
        out = []
        for layer in self.layers:
            if self._kind(layer) != "CONVOLUTION":
                continue
            name, g = self._name(layer), self._conv_geometry(layer)
            kh, kw = g["kernel"]
            out.append((name, self._conv_in[name], g["num_output"], kh if kh == kw else (kh, kw)))
        return out

    def conv_geometry(self, name: str) -> dict:
        """``num_output``, ``kernel``, ``stride``, ``pad``, ``hole`` ((h, w) pairs), ``group``, ``bias_term``
        of a CONVOLUTION layer, with caffe.proto defaults filled in."""
        return self._conv_geometry(self._layer(name))

    def lr_mults(self, name: str) -> list[float]:
        """The layer's ``blobs_lr`` (learning-rate multipliers for weights, bias); Caffe's default is 1 each."""
        layer = self._layer(name)
        return [float(self._check(layer, v)) for v in layer.get("blobs_lr", [])] or [1.0, 1.0]

    def decay_mults(self, name: str) -> list[float]:
        """The layer's ``weight_decay`` multipliers (weights, bias); Caffe's default is 1 each."""
        layer = self._layer(name)
        return [float(self._check(layer, v)) for v in layer.get("weight_decay", [])] or [1.0, 1.0]

    def fillers(self, name: str) -> dict[str, dict]:
        """``{"weight_filler": {...}, "bias_filler": {...}}`` from the layer's convolution_param, each ``{}``
        where the prototxt gives none (Caffe would then use its default ``constant`` 0 filler, which only
        matters when no pre-trained weights are loaded)."""
        p = self._layer(name).get("convolution_param", {})
        return {"weight_filler": dict(p.get("weight_filler", {})), "bias_filler": dict(p.get("bias_filler", {}))}

    @property
    def data_blob(self) -> str:
        """Name of the data layer's first top (``data``)."""
        return self._data_tops[0]

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, data: torch.Tensor, label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the net. ``data``: (N, 3, H, W) float32, mean-subtracted BGR 0..255; ``label``: (N, 1, H, W)
        or None. Returns every top blob by name (``data`` and ``label`` included); a layer writing in place
        (RELU, DROPOUT) replaces its blob, as Caffe's shared storage does. A layer needing a blob that is
        absent (e.g. ``label_shrink`` without ``label``) raises ``ValueError``."""
        if data.dim() != 4 or data.shape[1] != 3:
            raise ValueError(f"data must be (N, 3, H, W), got {tuple(data.shape)}")
        blobs: dict[str, torch.Tensor] = {self._data_tops[0]: data.float()}
        if label is not None:
            if label.dim() != 4 or label.shape[1] != 1 or label.shape[0] != data.shape[0] \
                    or label.shape[-2:] != data.shape[-2:]:
                raise ValueError(f"label must be (N, 1, H, W) like data, got {tuple(label.shape)}")
            blobs[self._data_tops[1]] = label.float()
        for layer in self.layers:
            kind = self._kind(layer)
            if kind in ("data", "skip"):
                continue
            name, bottoms, tops = self._name(layer), self._bottoms(layer), self._tops(layer)
            missing = [b for b in bottoms if b not in blobs]
            if missing:
                raise ValueError(f"layer {name!r} needs blob(s) {missing} that are not available"
                                 + (" (pass label= to forward)" if self._data_tops[1] in missing else ""))
            x = blobs[bottoms[0]]
            if kind == "CONVOLUTION":
                g = self._conv_geometry(layer)
                if name not in self.weights:
                    raise KeyError(f"no weights for CONVOLUTION layer {name!r}")
                weight, bias = self.weights[name]
                expect = (g["num_output"], self._conv_in[name] // g["group"], *g["kernel"])
                if tuple(weight.shape) != expect:
                    raise ValueError(f"layer {name!r}: weight shape {tuple(weight.shape)}, prototxt wants {expect}")
                if g["bias_term"]:
                    if bias is None or tuple(bias.shape) != (g["num_output"],):
                        raise ValueError(f"layer {name!r}: bias must have shape ({g['num_output']},)")
                else:
                    bias = None
                y = caffe_conv(x, weight.to(x), None if bias is None else bias.to(x), g["stride"], g["pad"],
                               g["hole"], g["group"])
            elif kind == "POOLING":
                g = self._pool_geometry(layer)
                y = caffe_pool(x, g["method"], g["kernel"], g["stride"], g["pad"])
            elif kind == "RELU":
                slope = float(self._check(layer, layer.get("relu_param", {}).get("negative_slope", 0.0)))
                y = torch.where(x > 0, x, x * slope) if slope else x.clamp_min(0.0)
            elif kind == "DROPOUT":
                y = x  # identity: deterministic comparison (Caffe's TEST-phase behaviour)
            elif kind == "ELTWISE":
                op, coeff = self._eltwise_args(layer, len(bottoms))
                xs = [blobs[b] for b in bottoms]
                if len({tuple(t.shape) for t in xs}) != 1:
                    raise ValueError(f"layer {name!r}: ELTWISE bottoms have different shapes "
                                     f"{[tuple(t.shape) for t in xs]}")
                if op == "SUM":
                    y = torch.zeros_like(xs[0])
                    for c, t in zip(coeff, xs):
                        y = y + c * t
                elif op == "PROD":
                    y = xs[0].clone()
                    for t in xs[1:]:
                        y = y * t
                else:
                    y = xs[0].clone()
                    for t in xs[1:]:
                        y = torch.maximum(y, t)
            elif kind == "INTERP":
                y = caffe_interp(x, **self._interp_args(layer))
            elif kind == "PADDING":
                y = caffe_padding(x, *self._padding_args(layer))
            else:  # pragma: no cover - _kind() covers every case
                raise NotImplementedError(kind)
            for t in tops:
                blobs[t] = y
        return blobs

    __call__ = forward


def random_weights(net: CaffeReferenceNet, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian weights for every CONVOLUTION layer of ``net``: ``{name: (W (out, in, kh, kw), b (out,))}``.

    W ~ N(0, sqrt(2 / fan_in)) (He-normal, fan_in = in * kh * kw), divided by 64 for layers reading the
    ``data`` blob directly, so that a mean-subtracted 0..255 BGR input (values of order +-100) gives
    activations of order 1 all the way through; b ~ N(0, 0.05) so ReLUs are neither all off nor exact
    linear maps of zero-bias inputs. Float32, deterministic for a given ``seed`` and net.
    """
    gen = torch.Generator().manual_seed(seed)
    bottoms = {net._name(layer): net._bottoms(layer) for layer in net.layers if net._kind(layer) == "CONVOLUTION"}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, cin, cout, kernel in net.param_layers():
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        group = net.conv_geometry(name)["group"]
        fan_in = cin // group * kh * kw
        std = math.sqrt(2.0 / fan_in) / (64.0 if net.data_blob in bottoms[name] else 1.0)
        w = torch.randn((cout, cin // group, kh, kw), generator=gen, dtype=torch.float32) * std
        b = torch.randn((cout,), generator=gen, dtype=torch.float32) * 0.05
        out[name] = (w, b)
    return out
