"""Helpers shared by the search tests: a synthetic objective, so the search logic is tested without a CRF."""

from __future__ import annotations

from crf import CRFParams


class Bowl:
    """A smooth objective with its maximum at ``optimum``; counts the configurations it scores."""

    def __init__(self, optimum):
        self.optimum = optimum
        self.calls: list[tuple] = []

    def __call__(self, p: CRFParams) -> float:
        self.calls.append((p.w1, p.sigma_alpha, p.sigma_beta))
        a, b, c = self.optimum
        return -((p.w1 - a) ** 2 + ((p.sigma_alpha - b) / 10) ** 2 + (p.sigma_beta - c) ** 2)
