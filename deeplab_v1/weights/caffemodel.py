"""Read and write Caffe ``.caffemodel`` files without Caffe.

A ``.caffemodel`` is a serialized ``NetParameter`` protobuf message. Only the few message types that hold
weights are declared here, programmatically, from the field numbers of Caffe's ``caffe.proto`` (no
``protoc``, no generated code); every other field (layer parameters, solver state, ...) is skipped by the
protobuf runtime as an unknown field.

Both layouts Caffe has written are read:

- ``"V1"``: ``NetParameter.layers`` (field 2) of old ``V1LayerParameter`` messages, with an enum layer
  type (``CONVOLUTION = 4`` ...) and blobs sized by ``num/channels/height/width``. The deeplab-public
  release (``train_iter_6000.caffemodel``, ``vgg16_20M.caffemodel``) uses this layout.
- ``"V2"``: ``NetParameter.layer`` (field 100) of ``LayerParameter`` messages, with a string type
  (``"Convolution"``) and blobs sized by ``BlobShape.dim``.

Blob shapes are returned in one canonical form, the one V2 Caffe uses, whatever the layout: a convolution
weight is (out, in, kh, kw), an InnerProduct weight (out, in), a bias (out,). Old (V1) blobs always carry
four legacy dimensions (a bias is (1, 1, 1, out), an InnerProduct weight (1, 1, out, in)); they are
reduced as follows (``canonical_shape``): blob 0 of a Convolution/Deconvolution layer keeps its 4-D
shape, blob 0 of an InnerProduct layer becomes (height, width), and every other blob loses its leading
1-sized dimensions (at least one dimension is kept). The shape stored in the file stays available as
``CaffeBlob.stored_shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..atomic import atomic_write_bytes
from ..errors import DeepLabError

__all__ = [
    "CaffeModelError",
    "CaffeBlob",
    "CaffeLayer",
    "CaffeNet",
    "V1_LAYER_TYPES",
    "canonical_shape",
    "read_caffemodel",
    "write_caffemodel",
]


class CaffeModelError(DeepLabError, ValueError):
    """A file that is not a readable ``.caffemodel`` (missing, truncated, not a NetParameter, a blob whose
    value count disagrees with its shape). The message names the file and, where known, the layer."""


#: Old (V1) ``LayerParameter.LayerType`` enum values (BVLC caffe.proto) -> the V2 type strings. The
#: deeplab-public fork adds INTERP = 41 and DENSE_CRF = 45; a value not listed is reported as ``"V1:<int>"``.
V1_LAYER_TYPES: dict[int, str] = {
    0: "None", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout",
    7: "EuclideanLoss", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col", 12: "ImageData",
    13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 16: "MultinomialLogisticLoss", 17: "Pooling",
    18: "ReLU", 19: "Sigmoid", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 23: "TanH",
    24: "WindowData", 25: "Eltwise", 26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss",
    29: "MemoryData", 30: "ArgMax", 31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal",
    36: "Silence", 37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution",
    41: "Interp", 45: "DenseCRF",
}
_V1_TYPE_CODES: dict[str, int] = {v: k for k, v in V1_LAYER_TYPES.items()}

# ------------------------------------------------------------------------------------------ message types
# Field numbers are those of caffe.proto (see the module docstring). ``V1LayerParameter.type`` is an enum
# in caffe.proto; it is declared int32 here, which is wire-compatible (both are varints) and keeps enum
# values this declaration does not know (the fork's INTERP, DENSE_CRF, ...) instead of dropping them.

_PACKAGE = "deeplab_v1.caffe_subset"


def _build_messages(data_as_bytes: bool) -> dict[str, type]:
    """Declare BlobShape, BlobProto, V1LayerParameter, LayerParameter and NetParameter.

    With ``data_as_bytes`` the float/double arrays (``data`` = 5, ``double_data`` = 8) are declared as
    ``repeated bytes``: a packed repeated float is encoded exactly like a bytes field holding the
    little-endian values (tag with wire type 2, length, payload), so the writer can hand numpy buffers to
    protobuf without converting every value to a Python float (20 M floats: 0.1 s instead of seconds).
    """
    F = descriptor_pb2.FieldDescriptorProto
    name = "caffe_subset_writer.proto" if data_as_bytes else "caffe_subset.proto"
    package = _PACKAGE + ("_writer" if data_as_bytes else "")
    fp = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto2")

    def message(msg_name: str, fields: Sequence[tuple]) -> None:
        m = fp.message_type.add(name=msg_name)
        for fname, number, ftype, label, *rest in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if ftype == F.TYPE_MESSAGE:
                f.type_name = f".{package}.{rest[0]}"
            elif rest and rest[0] == "packed":
                f.options.packed = True

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    if data_as_bytes:
        float_arrays = [("data", 5, F.TYPE_BYTES, rep), ("double_data", 8, F.TYPE_BYTES, rep)]
    else:
        float_arrays = [
            ("data", 5, F.TYPE_FLOAT, rep, "packed"),
            ("diff", 6, F.TYPE_FLOAT, rep, "packed"),
            ("double_data", 8, F.TYPE_DOUBLE, rep, "packed"),
            ("double_diff", 9, F.TYPE_DOUBLE, rep, "packed"),
        ]
    message("BlobShape", [("dim", 1, F.TYPE_INT64, rep, "packed")])
    message(
        "BlobProto",
        [
            ("num", 1, F.TYPE_INT32, opt),
            ("channels", 2, F.TYPE_INT32, opt),
            ("height", 3, F.TYPE_INT32, opt),
            ("width", 4, F.TYPE_INT32, opt),
            ("shape", 7, F.TYPE_MESSAGE, opt, "BlobShape"),
            *float_arrays,
        ],
    )
    message(
        "V1LayerParameter",
        [
            ("bottom", 2, F.TYPE_STRING, rep),
            ("top", 3, F.TYPE_STRING, rep),
            ("name", 4, F.TYPE_STRING, opt),
            ("type", 5, F.TYPE_INT32, opt),
            ("blobs", 6, F.TYPE_MESSAGE, rep, "BlobProto"),
        ],
    )
    message(
        "LayerParameter",
        [
            ("name", 1, F.TYPE_STRING, opt),
            ("type", 2, F.TYPE_STRING, opt),
            ("bottom", 3, F.TYPE_STRING, rep),
            ("top", 4, F.TYPE_STRING, rep),
            ("blobs", 7, F.TYPE_MESSAGE, rep, "BlobProto"),
        ],
    )
    message(
        "NetParameter",
        [
            ("name", 1, F.TYPE_STRING, opt),
            ("layers", 2, F.TYPE_MESSAGE, rep, "V1LayerParameter"),
            ("layer", 100, F.TYPE_MESSAGE, rep, "LayerParameter"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fp)
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is None:  # protobuf < 4.22
        factory = message_factory.MessageFactory(pool)
        get_class = factory.GetPrototype
    return {m.name: get_class(pool.FindMessageTypeByName(f"{package}.{m.name}")) for m in fp.message_type}


_READ = _build_messages(data_as_bytes=False)
_WRITE = _build_messages(data_as_bytes=True)

# ------------------------------------------------------------------------------------------ data classes


@dataclass
class CaffeBlob:
    """One parameter blob as stored: ``stored_shape`` is what the file says (num/channels/height/width
    for V1 blobs without ``shape``, else ``shape.dim``)."""

    data: np.ndarray
    stored_shape: tuple[int, ...]


@dataclass
class CaffeLayer:
    """One layer of a ``.caffemodel``.

    Attributes:
        name: the layer name (``conv1_1``, ``fc8_voc12``, ...).
        type: the V2 type string (``"Convolution"``, ``"InnerProduct"``, ``"Pooling"``, ``"ReLU"``,
            ``"Dropout"``, ``"Interp"``, ``"DenseCRF"``, ...); a V1 enum value not in ``V1_LAYER_TYPES``
            is ``"V1:<int>"``.
        blobs: float32 arrays in canonical shape (module docstring): convolution weight (out, in, kh, kw),
            InnerProduct weight (out, in), bias (out,).
        stored_shapes: the blob shapes as stored in the file.
        bottom, top: the layer's input / output blob names.
    """

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)
    stored_shapes: list[tuple[int, ...]] = field(default_factory=list)
    bottom: list[str] = field(default_factory=list)
    top: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Canonical blob shapes."""
        return [tuple(b.shape) for b in self.blobs]


@dataclass
class CaffeNet:
    """A parsed ``.caffemodel``: ``name`` (NetParameter.name), ``format`` (``"V1"`` or ``"V2"``), ``layers``
    in file order, ``path`` (the file read, or None)."""

    name: str
    format: str
    layers: list[CaffeLayer]
    path: Union[Path, None] = None

    def layer(self, name: str) -> CaffeLayer:
        """The first layer called ``name``.

        Raises:
            KeyError: no such layer (the message lists the layers that hold blobs).
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{self.path or self.name}: no layer {name!r}; layers with blobs: {self.names(with_blobs=True)}")

    def names(self, with_blobs: bool = False) -> list[str]:
        """Layer names in file order (only those holding blobs with ``with_blobs``)."""
        return [layer.name for layer in self.layers if layer.blobs or not with_blobs]


# --------------------------------------------------------------------------------------------- reading


def canonical_shape(layer_type: str, index: int, stored: Sequence[int]) -> tuple[int, ...]:
    """The canonical shape of a legacy 4-D (num, channels, height, width) blob (module docstring).

    Args:
        layer_type: the V2 type string of the layer holding the blob.
        index: the blob's position in the layer (0 = weight, 1 = bias for Convolution/InnerProduct).
        stored: the 4 legacy dimensions.
    """
    stored = tuple(int(d) for d in stored)
    if index == 0 and layer_type in ("Convolution", "Deconvolution"):
        return stored
    if index == 0 and layer_type == "InnerProduct":
        return stored[-2:]
    dims = list(stored)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def _blob_array(blob, path: Path, layer: str, layer_type: str, index: int, has_shape: bool) -> CaffeBlob:
    if has_shape:
        stored = tuple(int(d) for d in blob.shape.dim)
        shape = stored
    else:
        stored = (blob.num, blob.channels, blob.height, blob.width)
        shape = canonical_shape(layer_type, index, stored)
    if any(d < 0 for d in stored):
        raise CaffeModelError(f"{path}: layer {layer!r} blob {index}: negative dimension in shape {stored}")
    count = math.prod(shape)
    # np.array on a repeated scalar field copies the runtime's packed buffer directly (fast).
    if len(blob.data):
        values = np.array(blob.data, dtype=np.float32)
    elif len(blob.double_data):
        values = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        values = np.zeros(0, dtype=np.float32)
    if values.size != count:
        raise CaffeModelError(
            f"{path}: layer {layer!r} blob {index}: shape {stored} needs {count} values but the file holds "
            f"{values.size}"
        )
    return CaffeBlob(values.reshape(shape), stored)


def _looks_like_text(raw: bytes) -> bool:
    head = raw[:512]
    return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def read_caffemodel(path: Union[str, Path]) -> CaffeNet:
    """Parse a ``.caffemodel`` (either layout, module docstring).

    Args:
        path: the ``.caffemodel`` file (binary protobuf ``NetParameter``).

    Returns:
        A ``CaffeNet``: ``format`` is ``"V1"`` when the file uses ``layers`` (field 2), ``"V2"`` when it
        uses ``layer`` (field 100). Blobs are float32 numpy arrays in canonical shape (``double_data`` is
        converted to float32; ``diff`` is ignored).

    Raises:
        CaffeModelError: the file is missing or unreadable, truncated, not a NetParameter (random bytes,
            a text file such as a ``.prototxt``), holds no layer, mixes both layouts, or has a blob whose
            value count disagrees with its shape (the message names file, layer, blob and shape).
    """
    path = Path(path)
    if not path.is_file():
        raise CaffeModelError(f"{path}: .caffemodel file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CaffeModelError(f"{path}: cannot read ({exc})") from exc
    if not raw:
        raise CaffeModelError(f"{path}: empty file, not a .caffemodel")
    hint = " (it looks like a text file, e.g. a .prototxt, not a binary .caffemodel)" if _looks_like_text(raw) else ""
    net = _READ["NetParameter"]()
    try:
        net.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CaffeModelError(
            f"{path}: not a valid .caffemodel: protobuf parsing failed ({exc}); the file is truncated or not "
            f"a Caffe NetParameter{hint}"
        ) from exc
    if len(net.layers) and len(net.layer):
        raise CaffeModelError(
            f"{path}: holds both old 'layers' ({len(net.layers)}) and new 'layer' ({len(net.layer)}) entries; "
            "not a Caffe-written .caffemodel"
        )
    if not len(net.layers) and not len(net.layer):
        raise CaffeModelError(
            f"{path}: not a .caffemodel: no layer found (neither NetParameter field 2 'layers' nor 100 "
            f"'layer'){hint}"
        )
    fmt = "V1" if len(net.layers) else "V2"
    layers: list[CaffeLayer] = []
    for i, lp in enumerate(net.layers if fmt == "V1" else net.layer):
        if fmt == "V1":
            ltype = V1_LAYER_TYPES.get(lp.type, f"V1:{lp.type}")
        else:
            ltype = lp.type
        if not lp.name and not lp.HasField("type") and not len(lp.blobs):
            # Caffe always writes a name and a type; random bytes that happen to parse do not, and neither
            # do pre-2014 "V0" files (whose layers nest one level deeper, in V1 field 1).
            raise CaffeModelError(
                f"{path}: layer #{i} has no name, type or blobs: not a .caffemodel, or a pre-2014 'V0' one "
                f"(upgrade it with Caffe's upgrade_net_proto_binary){hint}"
            )
        blobs = [
            _blob_array(b, path, lp.name, ltype, j, b.HasField("shape")) for j, b in enumerate(lp.blobs)
        ]
        layers.append(
            CaffeLayer(
                name=lp.name,
                type=ltype,
                blobs=[b.data for b in blobs],
                stored_shapes=[b.stored_shape for b in blobs],
                bottom=list(lp.bottom),
                top=list(lp.top),
            )
        )
    return CaffeNet(name=net.name, format=fmt, layers=layers, path=path)


# --------------------------------------------------------------------------------------------- writing

LayerSpec = Union[CaffeLayer, tuple]


def _legacy_dims(shape: tuple[int, ...], where: str) -> tuple[int, int, int, int]:
    if len(shape) > 4:
        raise CaffeModelError(f"{where}: a V1 blob holds at most 4 dimensions, got shape {shape}")
    return tuple([1] * (4 - len(shape)) + list(shape))  # type: ignore[return-value]


def write_caffemodel(
    path: Union[str, Path],
    layers: Iterable[LayerSpec],
    format: str = "V1",
    name: str = "",
) -> Path:
    """Write a ``.caffemodel`` holding ``layers`` (atomically: temporary file in the same folder, then rename).

    Args:
        path: output file.
        layers: ``CaffeLayer`` objects or ``(name, type, blobs)`` tuples; ``type`` is a V2 type string
            (``"Convolution"``, ``"InnerProduct"``, ...; for V1 also ``"V1:<int>"``); ``blobs`` are arrays
            (numpy or torch on the CPU) in canonical shape, written as float32.
        format: ``"V1"`` (``layers`` field 2, enum types, blobs sized by num/channels/height/width, each
            shape left-padded with 1s to 4-D as old Caffe stores it) or ``"V2"`` (``layer`` field 100,
            string types, blobs sized by ``shape.dim``).
        name: ``NetParameter.name``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CaffeModelError: unknown format, a V1 type with no enum value, a blob of more than 4 dimensions
            for V1.
    """
    if format not in ("V1", "V2"):
        raise CaffeModelError(f"{path}: format must be 'V1' or 'V2', got {format!r}")
    path = Path(path)
    net = _WRITE["NetParameter"](name=name)
    for spec in layers:
        if isinstance(spec, CaffeLayer):
            lname, ltype, blobs, bottom, top = spec.name, spec.type, spec.blobs, spec.bottom, spec.top
        else:
            lname, ltype, blobs = spec
            bottom, top = [], []
        if format == "V1":
            if ltype.startswith("V1:"):
                code = int(ltype[3:])
            elif ltype in _V1_TYPE_CODES:
                code = _V1_TYPE_CODES[ltype]
            else:
                raise CaffeModelError(
                    f"{path}: layer {lname!r}: type {ltype!r} has no V1 enum value; known: {sorted(_V1_TYPE_CODES)}"
                )
            lp = net.layers.add(name=lname, type=code)
        else:
            lp = net.layer.add(name=lname, type=ltype)
        lp.bottom.extend(bottom)
        lp.top.extend(top)
        for j, blob in enumerate(blobs):
            if hasattr(blob, "detach"):  # a torch tensor
                blob = blob.detach().cpu().numpy()
            arr = np.ascontiguousarray(np.asarray(blob, dtype="<f4"))
            bp = lp.blobs.add()
            if format == "V1":
                bp.num, bp.channels, bp.height, bp.width = _legacy_dims(arr.shape, f"{path}: layer {lname!r} blob {j}")
            else:
                bp.shape.dim.extend(int(d) for d in arr.shape)
            if arr.size:  # wire format of a packed repeated float: little-endian float32s
                bp.data.append(arr.tobytes())
    atomic_write_bytes(path, net.SerializeToString())
    return path
