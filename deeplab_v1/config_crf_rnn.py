"""The ``model.crf_rnn:`` section: DeepLab trained end to end with the CRF as its last layer (CRF-as-RNN,
Zheng et al. ICCV 2015; DeepLab v1 Sec. 6; issue #24 item 3).

Kept beside ``config`` (whose ``ModelConfig.crf_rnn`` it is) so that ``config`` stays one screenful per
section; the types are checked by ``config``'s loader, the values by :func:`crf_rnn_problem`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from crf import CRFParams
from crf.params import RELEASE_LARGEFOV

__all__ = ["CRFRNNConfig", "crf_rnn_problem"]


@dataclass
class CRFRNNConfig:
    """``model.crf_rnn:`` section. ``enabled`` appends ``crf.DenseCRFLayer`` to the model (any v1 or v3
    name; ``deeplab_v1.models.crf_rnn``): the stride-8 scores are upsampled bilinearly to the input and
    refined by ``iterations_train`` mean-field steps in training (the loss on the refined scores at the
    crop's resolution, labels not shrunk, whatever ``train.label_mode`` says) and ``iterations_test`` at
    test (the score cache holds the refined scores at image resolution, stride 1). ``learn``: which of
    ``w1``, ``w2``, ``compatibility`` (C x C, started Potts) are trained (their lr: ``train.lr_mult``
    pattern ``crf``, default x1, no weight decay). ``params``: the initial ``crf.CRFParams`` (a mapping;
    keys left out take the release's LargeFOV values); the kernel widths stay fixed. With it on, the
    ``crf_search`` and ``crf`` stages are skipped: the CRF is inside the net."""

    enabled: bool = False
    iterations_train: int = 5
    iterations_test: int = 10
    learn: list[Literal["w1", "w2", "compatibility"]] = field(default_factory=lambda: ["w1", "w2", "compatibility"])
    params: CRFParams = RELEASE_LARGEFOV

    def build_options(self) -> dict[str, Any]:
        """``{"crf_rnn": {...}}``, the ``build_model`` option that appends the layer, or ``{}`` when off."""
        if not self.enabled:
            return {}
        return {"crf_rnn": {"params": self.params, "learn": tuple(self.learn),
                            "iterations_train": self.iterations_train, "iterations_test": self.iterations_test}}


def crf_rnn_problem(section: CRFRNNConfig) -> Optional[tuple[str, str]]:
    """(dotted key, what is wrong) of the first bad value of ``model.crf_rnn``, or None: iterations >= 1,
    ``learn`` without repeats, a learned kernel weight that starts > 0 (it is log-parametrised)."""
    for key in ("iterations_train", "iterations_test"):
        value = getattr(section, key)
        if value < 1:
            return f"model.crf_rnn.{key}", f"must be >= 1 mean-field iterations, got {value}"
    if len(set(section.learn)) != len(section.learn):
        return "model.crf_rnn.learn", f"must name each of w1, w2, compatibility at most once, got {section.learn}"
    for name in ("w1", "w2"):
        if name in section.learn and getattr(section.params, name) <= 0:
            return ("model.crf_rnn.params", f"has {name} = {getattr(section.params, name)}, which cannot be "
                    f"learned (a learned kernel weight must start > 0); set it > 0 or leave {name} out of learn")
    return None
