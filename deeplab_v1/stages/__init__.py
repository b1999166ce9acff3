"""The pipeline's stages, one module each, in the order of paper Fig. 1: the DCNN (``train``, ``test``:
scores at output_stride 8, bilinearly upsampled), the fully connected CRF (``crf_search`` for its
parameters, ``crf``), then ``evaluate`` (which writes ``report.md`` through ``report``).

Each module has ``run(ctx: RunContext) -> dict`` and says in its docstring which files of the run layout
(``deeplab_v1.layout``) it reads and writes; the returned dict is the stage's completion record.
"""

from __future__ import annotations

from typing import Callable

from ..context import RunContext
from ..layout import STAGES
from . import crf, crf_search, evaluate, test, train

#: Stage name -> its ``run`` function, in pipeline order.
STAGE_RUNNERS: dict[str, Callable[[RunContext], dict]] = {
    "train": train.run,
    "test": test.run,
    "crf_search": crf_search.run,
    "crf": crf.run,
    "evaluate": evaluate.run,
}
assert tuple(STAGE_RUNNERS) == STAGES

__all__ = ["STAGE_RUNNERS", "STAGES"]
