"""One writer per run folder: the ``.lock`` file, held with the kernel's ``flock`` (issue #20).

The lock is taken in one atomic step (``fcntl.flock(LOCK_EX | LOCK_NB)``), so of two processes that find a
lock file left by a dead writer exactly one takes it over; there is no check-then-act on a pid. The kernel
drops a dead holder's lock by itself, so a lock file without a holder is simply taken, whichever machine
wrote it (a run folder shared by several nodes needs a file system with working locks, as NFS v4 has).
The holder records its host and pid in the file, and a refusal names them. The file is removed on release
while still locked; a process that opened it before and locks it afterwards sees that the path no longer
leads to its file and tries again, so a removed lock file can never be held.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .context import StageError

__all__ = ["run_lock", "lock_holder"]

#: Attempts when the lock file is removed or replaced between opening and locking it.
_ATTEMPTS = 20


def lock_holder(lock: Path) -> str:
    """The holder a lock file names, for messages: ``"process <pid> on <host>"`` (``"process <pid>"`` for
    the plain pid of an older version), or ``"another process"`` while it has not written it yet."""
    try:
        text = Path(lock).read_text().strip()
    except OSError:
        return "another process"
    try:
        rec = json.loads(text)
        return f"process {int(rec['pid'])} on {rec['host']}"
    except (ValueError, KeyError, TypeError):
        return f"process {int(text)}" if text.isdigit() else "another process"


def _record(lock: Path) -> str:
    """The lock file's text ("" when it cannot be read)."""
    try:
        return Path(lock).read_text()
    except OSError:
        return ""


def _settle(lock: Path, before: str, seconds: float = 2.0) -> None:
    """Give a holder that has just taken the lock the moment it needs to write its record: the holder locks
    first and writes its host and pid after, so a refused contender may still read the record of the writer
    that died, or an empty file. Wait (at most ``seconds``) while the text is empty or still the one read
    before our attempt; a holder of long standing leaves it unchanged, and then the wait is the whole
    ``seconds``, once, on a refusal."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = _record(lock)
        if text.strip() and (text != before or _names_a_live_process_here(text)):
            return
        time.sleep(0.005)


def _names_a_live_process_here(text: str) -> bool:
    """Whether a lock record names a process alive on this host (then it is the holder's own record)."""
    try:
        rec = json.loads(text)
        if rec["host"] != socket.gethostname():
            return False
        os.kill(int(rec["pid"]), 0)
    except (ValueError, KeyError, TypeError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _take(lock: Path) -> int:
    """A descriptor of ``lock`` locked by this process, with this holder's host and pid written in it."""
    import fcntl

    for _ in range(_ATTEMPTS):
        before = _record(lock)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StageError(f"{lock}: cannot lock the run folder's lock file: {exc}") from None
            _settle(lock, before)
            raise StageError(f"{lock.parent}: the run folder is in use by {lock_holder(lock)} (its lock {lock}); "
                             "wait for it, or choose another output_dir") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if not same:  # released (and removed) by its holder after we opened it: try the new file
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n").encode())
        os.fsync(fd)
        return fd
    raise StageError(f"{lock.parent}: could not take the run folder's lock {lock} (it was replaced "
                     f"{_ATTEMPTS} times while taking it)")


@contextmanager
def run_lock(lock: Path) -> Iterator[None]:
    """Hold the run folder's lock file ``lock`` (``RunLayout.lock``) while the block runs.

    Raises:
        StageError: another live process holds it (the message names its pid and host, and the folder);
            the file system cannot lock files.
    """
    lock = Path(lock)
    fd = _take(lock)
    try:
        yield
    finally:
        try:
            lock.unlink(missing_ok=True)  # while still locked: see the module docstring
        finally:
            os.close(fd)
