"""``python -m deeplab_v1`` (and ``torchrun ... -m deeplab_v1 train|test|run EXPERIMENT.yaml``): the
``deeplab`` command (``deeplab_v1.cli.main``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
