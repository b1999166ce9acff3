"""The fully connected CRF stage of DeepLab v1 (Krähenbühl & Koltun 2011; DeepLab v1 Sec. 4.2).

This package never imports ``deeplab_v1``: it takes images and class probabilities as arrays.

- ``CRFParams`` / ``RELEASE_LARGEFOV``: the parameters (``crf.params``).
- ``dense_crf``, ``scores_to_probs``: inference on one image (``crf.dense``; backends ``pydensecrf``
  and ``torch``, which share the input checks of ``crf.inputs``; ``auto`` picks torch where it fits its
  memory budget, ``crf.backend_choice``).
- ``CRFTask``, ``run_crf_many``: many images in worker processes (``crf.pool``), resumable, reading CRF
  input files (``crf.input_files``) (``crf.parallel``).
- ``SearchConfig``, ``run_search``: the paper's coarse-to-fine parameter search on search input files
  (``crf.search``, Sec. 5), scored with ``crf.confusion`` and ``crf.trimap``.
- ``crf.densecrf``, ``crf.utils``: a drop-in for ``pydensecrf.densecrf`` / ``pydensecrf.utils`` (any
  features, Potts/diagonal/matrix compatibilities, every normalisation: ``crf.meanfield``).
- ``python -m crf apply | search | evaluate`` (``crf.cli``): any model's class maps in folders
  (``crf.folders``) -> labels, the search, metrics and trimap.
- ``DenseCRFLayer``: mean-field as a trainable ``nn.Module`` (CRF-as-RNN) on the same lattices, learnable
  kernel weights and label compatibility (``crf.layer``, backward by the filter's transpose ``crf._adjoint``);
  ``fit_crf`` fits them on cached scores by gradient (``crf.learn``).
- ``crf.atomic``: the atomic files every output of the distribution is written with.

Floors, lowest first (a module imports only from floors below it): ``errors``, ``atomic``, ``params``,
``inputs``, ``confusion``, ``trimap``, ``pool``, ``permutohedral``, ``step_times``, ``utils``, ``folders``;
``meanfield``, ``backend_choice``, ``input_files``, ``torch_backend``; ``_adjoint``, ``densecrf``, ``dense``;
``layer``; ``learn``; ``parallel``;
``search``; ``cli``.
"""

from .params import RELEASE_LARGEFOV, CRFParams

__all__ = ["CRFParams", "RELEASE_LARGEFOV", "dense_crf", "scores_to_probs", "CRFTask", "CRFRunSummary",
           "run_crf_many", "SearchConfig", "SearchResult", "run_search", "DenseCRFLayer", "fit_crf", "FitResult"]


def __getattr__(name: str):
    # The other names load on first use (PEP 562), so that ``import crf`` stays as light as crf.params.
    if name in ("dense_crf", "scores_to_probs"):
        from . import dense as module
    elif name in ("CRFTask", "CRFRunSummary", "run_crf_many"):
        from . import parallel as module
    elif name in ("SearchConfig", "SearchResult", "run_search"):
        from . import search as module
    elif name == "DenseCRFLayer":
        from . import layer as module
    elif name in ("fit_crf", "FitResult"):
        from . import learn as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
