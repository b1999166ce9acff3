"""The project's one base error class, on the lowest floor so that both packages derive from it.

``crf`` never imports ``deeplab_v1``, and ``deeplab_v1`` builds on ``crf``; so the base of every
user-facing error of the distribution lives here and ``deeplab_v1.errors`` re-exports it. Each concrete
error also derives from the built-in type callers have always caught (``ValueError`` for bad input,
``RuntimeError`` for a failed stage), so ``except ValueError`` keeps working. The ``deeplab`` command
catches ``DeepLabError`` and prints its message on one line.
"""

from __future__ import annotations

__all__ = ["DeepLabError", "CRFInputError", "CRFTaskError"]


class DeepLabError(Exception):
    """Base of every user-facing error of deeplab-v1 (``deeplab_v1`` and ``crf``): the message names the
    file, key or value and what is wrong."""


class CRFTaskError(DeepLabError, RuntimeError):
    """A CRF job of ``crf.parallel`` or ``crf.search`` failed; the message names its input (and output)
    files and the cause (a damaged file, a label of another size, ...)."""


class CRFInputError(DeepLabError, ValueError):
    """A bad argument or input of ``crf`` (CRF parameters, an image or probabilities of the wrong shape or
    values, a search configuration, a backend or device name); the message names the argument, what was
    expected and what was given. A ``ValueError``, so ``except ValueError`` keeps working, and a
    ``DeepLabError``, so the ``deeplab`` command prints it on one line (exit status 2)."""
