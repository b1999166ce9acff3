"""What the weights modules pass around: a source's parameter layer in Caffe terms (``SourceLayer``) and the
account of a conversion (``ConversionReport``; ``InitReport`` for ``load_init``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "InitReport", "SourceLayer"]


@dataclass
class SourceLayer:
    """A parameter layer of a weights source in Caffe terms.

    Attributes:
        name: the layer name in the source (``conv1_1``, ``fc8_voc12``).
        type: ``"Convolution"`` or ``"InnerProduct"`` (other types are refused when mapped).
        blobs: [weight, bias]: convolution (out, in, kh, kw) or InnerProduct (out, in), bias (out,);
            numpy arrays or tensors, float32.
    """

    name: str
    type: str
    blobs: list


@dataclass
class ConversionReport:
    """What a conversion did, layer by layer (Caffe layer names of the model).

    Attributes:
        source: the file (or description) read.
        source_kind: ``caffemodel-V1``, ``caffemodel-V2``, ``imagenet-torchvision``, ``imagenet-caffe``
            or ``checkpoint``; ``+imagenet`` is appended to a caffemodel kind treated as an ImageNet
            classifier (module docstring).
        model: the model's name.
        loaded: model layers whose weights came from the source.
        new: model layers left at their fresh initialisation (allowed: fc8/MSc for ImageNet sources,
            ``reinit_fc8``, ``allow_new``).
        unused: source layers (or checkpoint keys' layers) holding weights that were not used.
        notes: per layer, how it was made (``fc8``: ``from fc8_voc12``; ``fc6``: the decimation).
    """

    source: str
    source_kind: str
    model: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, list, dict), so a checkpoint holding it loads with ``weights_only``."""
        return asdict(self)

    def format(self) -> str:
        """A multi-line, human-readable account (the ``deeplab convert`` output)."""
        lines = [
            f"source: {self.source} ({self.source_kind})",
            f"model: {self.model}",
            f"loaded ({len(self.loaded)}): {', '.join(self.loaded) or '-'}",
            f"new ({len(self.new)}): {', '.join(self.new) or '-'}",
            f"unused ({len(self.unused)}): {', '.join(self.unused) or '-'}",
        ]
        lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        def short(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

        text = f"{self.source_kind}: loaded {len(self.loaded)} layers"
        if self.new:
            text += f"; new: {short(self.new)}"
        if self.unused:
            text += f"; unused: {short(self.unused)}"
        return text


class InitReport(ConversionReport):
    """What ``load_init`` did (same fields as ``ConversionReport``); its ``str`` is the one-line summary
    the experiment runner logs for ``model.init``."""
