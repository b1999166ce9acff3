"""The fully connected CRF stage of DeepLab v1 (Krähenbühl & Koltun 2011; DeepLab v1 Sec. 4.2).

This package never imports ``deeplab_v1``: it takes images and class probabilities as arrays.

- ``CRFParams`` / ``RELEASE_LARGEFOV``: the parameters (``crf.params``).
- ``dense_crf``, ``scores_to_probs``: inference on one image (``crf.dense``; backends ``pydensecrf``
  and ``torch``).
- ``CRFTask``, ``run_crf_many``: many images in worker processes, resumable (``crf.parallel``).
- ``SearchConfig``, ``run_search``: the paper's coarse-to-fine parameter search (``crf.search``, Sec. 5).
"""

from importlib import import_module

from .params import RELEASE_LARGEFOV, CRFParams

# The other names load on first use (PEP 562): ``python -m crf.search`` (torchrun) must not find
# crf.search already imported by the package, and ``import crf`` stays as light as crf.params.
_LAZY = {
    "dense_crf": "dense",
    "scores_to_probs": "dense",
    "CRFTask": "parallel",
    "CRFRunSummary": "parallel",
    "run_crf_many": "parallel",
    "SearchConfig": "search",
    "SearchResult": "search",
    "run_search": "search",
}

__all__ = ["CRFParams", "RELEASE_LARGEFOV", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
