"""``python -m crf apply | search | evaluate`` (see ``crf.cli``)."""

import sys

from .cli import main
from .memory import reuse_freed_memory

if __name__ == "__main__":
    reuse_freed_memory()  # the entry point decides the process-wide allocator setting (speed only)
    sys.exit(main())
