"""Atomic files, the one mechanism of the distribution: everything ``crf`` and ``deeplab_v1`` write
(checkpoints, score caches, label PNGs, search tables, figures, JSON, reports) goes to a temporary file in
the target's folder and is renamed into place, so a killed run never leaves a half-written file and a rerun
can trust every file it finds.

It lives on the lowest floor (``crf`` never imports ``deeplab_v1``); ``deeplab_v1.atomic`` re-exports it.
Every file gets the usual permissions, ``0o666 & ~umask`` (as ``open(path, "w")`` would give), not the
``0o600`` of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "file_mode"]


def file_mode() -> int:
    """The mode a newly created file gets under the current umask: ``0o666 & ~umask``."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at ``path`` only once the ``with`` block has finished.

    The data goes to a temporary file beside ``path`` (missing folders are created), is flushed to disk and
    renamed over ``path`` with ``os.replace``; on an exception the temporary file is removed and ``path``
    keeps its old content. The file gets the usual permissions (:func:`file_mode`: 0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
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
