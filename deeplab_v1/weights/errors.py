"""The errors of ``deeplab_v1.weights`` (the floor every other weights module stands on).

Both derive from ``deeplab_v1.errors.DeepLabError`` (what the ``deeplab`` command reports) and from
``ValueError`` (what callers have always caught). ``CaffeModelError`` (a damaged ``.caffemodel``) lives with
its reader, ``deeplab_v1.weights.caffemodel``.
"""

from __future__ import annotations

from ..errors import DeepLabError

__all__ = ["CheckpointError", "WeightsError"]


class WeightsError(DeepLabError, ValueError):
    """Weights that do not fit the model: a shape mismatch, a layer missing from the file, a different
    class count in fc8, an unreadable or unrecognised file. The message names the file, the layer and
    the shapes involved."""


class CheckpointError(WeightsError):
    """A checkpoint file that is missing, not loadable with ``torch.load(weights_only=True)``, not a dict,
    or (``load_checkpoint``) not a checkpoint of ours. The message names the file."""
