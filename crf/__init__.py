"""The fully connected CRF stage of DeepLab v1 (Krähenbühl & Koltun 2011; DeepLab v1 Sec. 4.2).

This package never imports ``deeplab_v1``: it takes images and class probabilities as arrays.
"""

from .params import RELEASE_LARGEFOV, CRFParams

__all__ = ["CRFParams", "RELEASE_LARGEFOV"]
