"""``python -m crf.search`` (and ``torchrun ... -m crf.search``): runs :func:`crf.search.cli.main`.

Worker processes (``spawn``) unpickle the functions of ``crf.search.evaluate``, never this module's; and
multiprocessing does not re-run a ``__main__`` submodule in them."""

import sys

from ..memory import reuse_freed_memory
from .cli import main

reuse_freed_memory()  # the entry point decides the process-wide allocator setting (speed only)
sys.exit(main())
