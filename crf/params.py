"""Parameters of the fully connected CRF (Krähenbühl & Koltun 2011) as DeepLab v1 uses it.

Source: DeepLab v1 paper (Chen et al., ICLR 2015) Sec. 4.2, Eq. 2 and Sec. 5. The pairwise potential
is Potts-weighted ``w1 * exp(-|p_i - p_j|^2 / (2 sigma_alpha^2) - |I_i - I_j|^2 / (2 sigma_beta^2))
+ w2 * exp(-|p_i - p_j|^2 / (2 sigma_gamma^2))`` with positions p in pixels and colours I in RGB 0..255.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from .errors import CRFInputError


@dataclass(frozen=True)
class CRFParams:
    """Typed CRF parameters.

    Args:
        w1: weight of the bilateral (appearance) kernel; cross-validated in the paper, in [5, 10].
        sigma_alpha: spatial standard deviation of the bilateral kernel, in pixels ([50, 100]).
        sigma_beta: colour standard deviation of the bilateral kernel, in RGB 0..255 units ([3, 10]).
        w2: weight of the Gaussian (smoothness) kernel; fixed to 3 in the paper.
        sigma_gamma: spatial standard deviation of the Gaussian kernel, in pixels; fixed to 3.
        iterations: number of mean-field iterations; 10 for every number in the paper.

    Raises:
        CRFInputError (a ValueError): a weight is negative or not finite, a standard deviation is not positive, or
            ``iterations`` is not a positive integer. The message names the field and the value.
    """

    w1: float
    sigma_alpha: float
    sigma_beta: float
    w2: float = 3.0
    sigma_gamma: float = 3.0
    iterations: int = 10

    def __post_init__(self) -> None:
        for name in ("w1", "w2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CRFInputError(f"CRFParams.{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("sigma_alpha", "sigma_beta", "sigma_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise CRFInputError(f"CRFParams.{name} must be a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise CRFInputError(f"CRFParams.iterations must be an integer >= 1, got {it!r}")

    def to_dict(self) -> dict:
        """The parameters as a plain dict (JSON/YAML friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CRFParams":
        """Build from a dict, rejecting unknown keys with a message that names them.

        Raises:
            CRFInputError (a ValueError): an unknown key, or a value that fails the checks above.
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise CRFInputError(f"unknown CRF parameter(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


#: Values found in the release's ``run_densecrf.sh`` for DeepLab-LargeFOV (DEEPLAB_V1_FACTS.md).
RELEASE_LARGEFOV = CRFParams(w1=4.0, sigma_alpha=49.0, sigma_beta=5.0)
