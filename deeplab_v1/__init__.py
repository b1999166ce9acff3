"""deeplab_v1: a faithful PyTorch reproduction of DeepLab v1 (Chen et al., ICLR 2015)."""

__version__ = "0.1.0"
