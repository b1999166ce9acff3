"""Writers that share a process or a run folder (issue #20): atomic writes from many threads keep the
process umask and the files' modes; two processes racing for a run folder's stale lock: exactly one wins."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from crf.atomic import atomic_write_bytes, current_umask, file_mode


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a right mode is not a coincidence of the defaults."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_eight_threads_of_atomic_writes_keep_the_umask_and_the_modes(tmp_path, umask_027):
    start = threading.Barrier(8)
    errors: list[BaseException] = []
    modes: list[int] = []

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(150):  # a new folder every few files: mkdir also honours the umask
                atomic_write_bytes(tmp_path / f"t{t}" / f"d{i // 5}" / f"f{i}.bin", b"x" * 64)
                modes.extend(file_mode() for _ in range(10))  # what a writer asks of the umask
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as on a busy many-core machine
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert current_umask() == umask_027
    mask = os.umask(umask_027)  # the one reading that changes it, after every writer has finished
    assert mask == umask_027
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    folders = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert len(files) == 8 * 150 and not [p for p in files if p.name.endswith(".tmp")]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {oct(0o750)}
    assert set(modes) == {0o640} and file_mode() == 0o640
