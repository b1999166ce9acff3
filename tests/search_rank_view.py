"""Run ``python -m crf.search`` as one torchrun rank that sees a machine of its own: the cores, load average
and physical memory of ``RANK_VIEWS[RANK]`` (``os.sched_getaffinity``, ``os.cpu_count``, ``os.getloadavg``,
``os.sysconf("SC_PHYS_PAGES")`` patched before the search is imported). Used by tests/test_search_plan.py:
ranks that disagree on the machine must still give the results of one process."""

from __future__ import annotations

import os
import sys

#: rank -> (cores, 1-minute load average, physical memory in bytes): rank 0 a small idle machine, rank 1 a
#: large busy one.
RANK_VIEWS = {0: (1, 0.0, 128 << 20), 1: (4, 50.0, 64 << 30)}


def see(cores: int, load: float, memory: int) -> None:
    """Make this process see ``cores`` cores, ``load`` and ``memory`` bytes of physical memory."""
    real_sysconf = os.sysconf
    page = real_sysconf("SC_PAGE_SIZE")
    os.sched_getaffinity = lambda pid=0: set(range(cores))
    os.cpu_count = lambda: cores
    os.getloadavg = lambda: (load, load, load)
    os.sysconf = lambda name: memory // page if name == "SC_PHYS_PAGES" else real_sysconf(name)


if __name__ == "__main__":
    see(*RANK_VIEWS[int(os.environ["RANK"])])
    from crf.search.cli import main

    sys.exit(main(sys.argv[1:]))
