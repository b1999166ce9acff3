"""Atomic files, the one mechanism of the distribution: everything ``crf`` and ``deeplab_v1`` write
(checkpoints, score caches, label PNGs, search tables, figures, JSON, reports) goes to a temporary file in
the target's folder and is renamed into place, so a killed run never leaves a half-written file and a rerun
can trust every file it finds.

It lives on the lowest floor (``crf`` never imports ``deeplab_v1``); ``deeplab_v1.atomic`` re-exports it.
Every file gets the usual permissions, ``0o666 & ~umask`` (as ``open(path, "w")`` would give), not the
``0o600`` of ``tempfile.mkstemp``: the temporary file is created with mode ``0o666`` and the kernel applies the
umask (and a folder's default ACL). The process umask is never changed, so writer threads may call this
concurrently (issue #20: setting it to 0 and back on every call raced between threads and left it at 0).
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "file_mode"]


def _proc_umask() -> int | None:
    """The umask from Linux's ``/proc/self/status`` (``Umask:``, kernel >= 4.7), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    mask = _proc_umask()
    if mask is None:  # no /proc: imports run before any writer thread starts; the one change, undone at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it: from ``/proc/self/status`` on Linux, elsewhere the one
    found at import (this module never changes the umask after that, so concurrent writers cannot race on
    it; issue #20)."""
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


def file_mode() -> int:
    """The mode a newly created file gets under the current umask: ``0o666 & ~umask`` (:func:`current_umask`,
    which never changes the umask)."""
    return 0o666 & ~current_umask()


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file ``.<name>.<random>.tmp`` beside ``path``, opened for writing: mode ``0o666``
    less the umask, applied by the kernel (as ``open(path, "w")``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary file name for {path.name}")  # pragma: no cover


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at ``path`` only once the ``with`` block has finished.

    The data goes to a temporary file beside ``path`` (missing folders are created), is flushed to disk and
    renamed over ``path`` with ``os.replace``; on an exception the temporary file is removed and ``path``
    keeps its old content. The file gets the usual permissions (:func:`file_mode`: 0666 less the umask); the
    umask is never changed, so threads may write concurrently.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
