"""User-facing errors: one base class (``DeepLabError``, defined in ``crf.errors``, the lowest floor) that
every error the ``deeplab`` command reports derives from."""

from __future__ import annotations

from crf.errors import DeepLabError

__all__ = ["DeepLabError"]
